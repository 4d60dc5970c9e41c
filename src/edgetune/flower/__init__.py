"""edgetune on Flower: the federated algorithms of `edgetune.fed` on real SuperLink and
SuperNode processes.

- `codec`: payloads <-> Flower records (LoRA tensors as one raw array, traces as bytes);
- `server_app` / `client_app`: the ServerApp and ClientApp (Message API);
- `app/`: the Flower app folder `flwr run` packages (its pyproject names the components);
- `local`: start a SuperLink and N SuperNodes on 127.0.0.1, launch runs, stop by PID.

Flower is an optional dependency (`pip install edgetune[flower]`); nothing here is
imported by `import edgetune`.
"""
