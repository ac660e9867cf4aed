"""The tags prunetune puts on MLflow runs: how a parent and its children are found again."""

TAG_PARENT = "mlflow.parentRunId"  # MLflow's own: nests a child under its parent in the UI
TAG_ROLE = "prunetune.role"  # "parent" (one per search) or "trial" (one per trial)
TAG_RUN_UID = "prunetune.run_uid"  # the search's run_uid from prunetune.json: finds the parent
TAG_TRIAL_ID = "prunetune.trial_id"
TAG_TRIAL_KEY = "prunetune.trial_key"  # stable across resumes: finds the child
TAG_NODE = "prunetune.node"
TAG_STATUS = "prunetune.status"  # finished | failed | stopped, as in trials.jsonl
TAG_FINAL_STEP = "prunetune.final_step"  # the step the final metrics were logged at
TAG_LOGGED = "prunetune.logged"  # "1" once a child is completely logged; set last
TAG_BEST_TRIAL = "prunetune.best_trial_id"
TAG_FIDELITY = "prunetune.fidelity"  # a trial's: "full", or "proxy" (a searcher's short fine-tune)
# What a search is, on its parent and every child, so MLflow's UI can filter and group by them.
TAG_METHOD = "prunetune.method"
TAG_MODEL = "prunetune.model"
TAG_DATASET = "prunetune.dataset"
TAG_MACS_TARGET = "prunetune.macs_target"

# MLflow's own experiment tags. MLflow 3's UI opens an experiment on its GenAI traces unless its
# kind says it holds model training runs (the values are the UI's ExperimentKind enum).
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND_TRAINING = "custom_model_development"
TAG_EXPERIMENT_NOTE = "mlflow.note.content"  # the experiment's description, shown above its runs
TAG_SHARED_VIEW_PREFIX = "mlflow.sharedViewState."  # a saved runs view, opened by ?viewStateShareKey=KEY
