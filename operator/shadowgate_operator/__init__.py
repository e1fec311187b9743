"""shadowgate operator: reconciles ShadowDeployment resources (kopf glue, pure builders and decisions)."""
