"""core: settings, message store and states, queue names and dispatch, routing, and admit(): what every other room stands on."""
