"""jacmatch inside other training loops, each importing its framework only when imported:

- :mod:`jacmatch.integrations.lightning`: a LightningModule (and a DataModule over
  jacmatch's data sets);
- :mod:`jacmatch.integrations.transformers`: a Hugging Face ``Trainer`` subclass;
- :mod:`jacmatch.integrations.torchdistill`: jacmatch's terms and forward processes in
  torchdistill's registries, for its YAML-configured distillation box.

They sit above :mod:`jacmatch.training` and the maths, as the command line does.
"""
