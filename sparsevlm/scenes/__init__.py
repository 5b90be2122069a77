"""Generated scenes and their questions, each knowing its evidence patches: the worlds the app's scene studio and the
engine's `eval` benchmark draw from (v2, the embedded model's world; the independent renderer). The model trained on
them is trained and measured in `training/`."""
