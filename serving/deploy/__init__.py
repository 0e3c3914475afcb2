"""Deploying to SageMaker from a ``deploy.yaml`` spec (``lmi deploy``) and calling what runs (``lmi invoke``).

``spec`` parses and validates the YAML once; ``plan`` turns it into SageMaker requests; ``apply`` and
``cleanup`` send them through ``sagemaker``; ``local`` runs the same containers on the local engine with
``model_data`` fetching their S3 data; ``invoke`` and ``stream`` call an endpoint or a server.
"""

from serving.deploy.fields import SpecError
from serving.deploy.spec import Component, Container, DeploySpec, ModelData, Startup, load_spec, parse_spec

__all__ = [
    "Component",
    "Container",
    "DeploySpec",
    "ModelData",
    "SpecError",
    "Startup",
    "load_spec",
    "parse_spec",
]
