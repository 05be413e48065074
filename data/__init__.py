"""The data side of the tool, one module per job: data sets and their readers, the resize
cache, batched transforms and loaders. ``datasets`` maps the modules and re-exports what the
rest of the project uses."""
