"""What a moelab directory holds: the file names every reader and writer of checkpoint/ uses.

A model directory (``moelab.checkpoint.model_files.save_model``) holds ``config.yaml`` +
``model.safetensors`` (+ ``manifest.json``, and a ``tokenizer.json`` when one was given).

A training run keeps one directory per saved step, ``RUN/checkpoints/step_000100/``, holding
- ``model.safetensors`` + ``config.yaml`` (the model: ``moelab.load`` reads these),
- ``run_config.yaml`` (the whole run config) and ``tokenizer.json``,
- ``trainer_state.pt`` (optimizer, scheduler and RNG states; tensors and plain Python values only,
  read back with ``torch.load(weights_only=True)``) and ``trainer_state.json`` (step, data position),
- ``manifest.json`` (size and SHA-256 of every file, ``moelab.checkpoint.integrity``).
A multi-process run's checkpoint (``moelab.checkpoint.distributed``) has DCP shards under ``dcp/``
and per-rank RNG files instead of ``model.safetensors`` and ``trainer_state.pt``.
"""

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
STATE_PT = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
DCP_DIR = "dcp"
REQUIRED = (CONFIG, WEIGHTS, "run_config.yaml", "tokenizer.json", STATE_PT, STATE_JSON)
# a multi-process run's checkpoint: DCP shards instead of the two files
REQUIRED_DCP = (CONFIG, f"{DCP_DIR}/.metadata", "run_config.yaml", "tokenizer.json", STATE_JSON)
