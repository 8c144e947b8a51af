"""Deployment: container images (docker/), the Helm chart (helm/) and the whole stack on one machine
(local/). Only deploy.local is Python that others import (the local Triton launcher)."""
