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
