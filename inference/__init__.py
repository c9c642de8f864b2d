"""inference: pure compute on an ECG: preprocessing, model registry, quality gate, measurements, explanations."""
