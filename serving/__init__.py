"""The SageMaker serving image's recipe (Dockerfile, pinned GPU requirements), shipped as package data."""
