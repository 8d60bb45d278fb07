"""Tools around the Hub model package ``modeling_instructcell``: presets and offline tokenizers."""
