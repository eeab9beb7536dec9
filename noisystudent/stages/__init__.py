"""One module per stage; each reads cfg + run_dir and writes its step directory."""

# stage name -> its module (import is a Python keyword): the one list of stages, read by the entry point
MODULES = {"teacher": "teacher", "pseudolabel": "pseudolabel", "student": "student", "finetune": "finetune",
           "evaluate": "evaluate", "iterate": "iterate", "export": "export", "predict": "predict", "import": "importer"}
STAGES = tuple(MODULES)
