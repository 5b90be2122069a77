"""Training and measuring the embedded scenes-llava model: the recipe, its auxiliary heads, the export, held-out
evaluation, LLaVA-likeness and the model card.

Nothing here runs when the app or the engine runs: `sparsevlm/` and `app/` never import this package (a test
checks it), and the Docker image leaves it out. Run its modules from the repository root, e.g.
`python -m training.train_llava --help`.
"""
