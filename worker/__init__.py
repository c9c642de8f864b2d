"""worker: the Celery app, its thin tasks and the analysis and delivery jobs behind them."""
