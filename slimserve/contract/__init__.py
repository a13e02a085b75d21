"""The API as clients and AWS see it: API Gateway's events and limits, and the OpenAPI document."""
