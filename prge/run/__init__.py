"""A training run on the host: `train` (setup and the eager stepper), `evaluate` (by task kind),
`adapters` (PEFT files), `suite` (every task, one table)."""
