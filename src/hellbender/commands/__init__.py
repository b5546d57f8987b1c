"""One module per CLI command: each takes a resolved config, does the whole job in pipeline order
(tokenizer → data → model → loop → outputs) and returns what the CLI prints.

``train`` writes the outputs; ``evaluate``, ``merge_lora`` and ``inference`` find them through
:mod:`hellbender.commands.trained`. The CLI (:mod:`hellbender.cli`) only parses arguments, calls
one of these functions and prints the result.
"""
