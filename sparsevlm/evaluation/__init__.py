"""The pruning benchmark on generated scenes (`python -m sparsevlm eval`), one concern a module:

- `recall`: evidence recall, the share of a question's evidence patches a run still keeps or represents (reads a
  trace; no torch);
- `runner`: the benchmark's settings and the loop that asks every held-out question of each of them;
- `stats`: 95% intervals, paired differences, the ordering at one budget;
- `table`: the Markdown report;
- `figure`: the curves and the interactive plotly figure;
- `png`: the same curves drawn by hand with PIL (no browser needed).

Nothing is imported here, so reading one module (the app's renderers read `recall`) loads no other.
"""
