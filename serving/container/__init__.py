"""`lmi container build|run|test|stop`: the image, run as SageMaker runs it, through the docker SDK.

engine.py finds a Docker-API engine (DOCKER_HOST, Docker, or podman's API service, started when
needed); build.py fills the build context and builds container/Containerfile.*; run.py starts an
image as SageMaker does and waits for /ping; smoke.py checks a running container; cli.py wires them.
"""
