"""Reading and writing checkpoints: validated safetensors, sources (HF folders, single files, dicts), the sharded
writer, the output folder's life cycle (partial folder, journal, atomic rename) and the local cache."""
