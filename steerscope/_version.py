__version__ = "0.3.0"

# The layout of a saved job config (a job folder's config.json: kind, versions, config). Bump it
# only when a steerscope that reads the current number would misread a new file (a renamed or
# re-meant setting, a changed layout); an added setting needs no bump, older files are filled with
# its default (config.py, "Saved configs"). The vector file's format is directions.vectors.FORMAT_VERSION.
CONFIG_FORMAT = 1
