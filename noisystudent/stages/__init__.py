"""One module per stage; each reads cfg + run_dir and writes its step directory."""

STAGES = ("teacher", "pseudolabel", "student", "finetune", "evaluate", "iterate", "export", "predict", "import")
