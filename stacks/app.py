"""The CDK app for one config: a stack per app, constructs per concern."""

import aws_cdk as cdk
from constructs import Construct

from slimserve.config import AppConfig

from .model_store import ModelStore, ModelStoreProps


class SlimserveStack(cdk.Stack):
    def __init__(self, scope: Construct, construct_id: str, config: AppConfig, **kwargs):
        super().__init__(scope, construct_id, **kwargs)
        self.model_store = ModelStore(self, "ModelStore", ModelStoreProps(encryption=config.model_store_encryption))
        cdk.CfnOutput(self, "ModelStoreBucket", value=self.model_store.bucket.bucket_name)


def build_app(config: AppConfig, app: cdk.App | None = None) -> cdk.App:
    app = app or cdk.App()
    environment = cdk.Environment(account=config.account, region=config.region) if config.account or config.region else None
    SlimserveStack(app, config.name, config, env=environment,
                   description=f"slimserve app {config.name}: {len(config.models)} models")
    return app
