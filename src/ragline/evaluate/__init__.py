"""`ragline eval`: measure retrieval and answers on question sets, sweep settings, price the tokens.

Every command is a library call first (`evaluate_retrieval`, `evaluate_answers`,
`run_sweep`, `cost_report`); the CLI in `ragline.cli.eval` only parses and prints.
"""
