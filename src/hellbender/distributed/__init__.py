"""Many processes: the ranks (:mod:`.world`), how a model is spread over them (:mod:`.parallel`)
and starting them (:mod:`.launch`). Everything goes through ``torch.distributed`` and torchrun;
hellbender has no launcher or communication layer of its own."""
