"""contextd as an OCI runtime: podman (conmon), containerd (containerd-shim-runc-v2) and
CRI-O run containers on cowfs roots through runc's command line (``contextd-oci``).

- spec: the parts of a bundle's config.json contextd honours; the rest refused.
- state: what a container is (created, running, stopped) from its state directory.
- init: the container's first process, from fork to exec (its root, its limits).
- container: the verbs (create, start, state, kill, delete, exec, ps).
- roots: the daemon's side: an image's cowfs template, a container's clone and mount.
- cli: runc's command line in front of them.
"""
