"""Running the stages: Prefect flows, team services, DVC's lock and environment, generating dvc.yaml."""
