"""Local servers on 127.0.0.1: the bundled Triton (tritonserver.py, `make triton`, the tests) and the
whole stack of Triton, the service and Prometheus (stack.py, `make up` / `make down`). Stdlib only."""
