"""containerd config.toml files as operators have them, and helpers to look at a merged one."""
from installer_module import load_toml

ct = load_toml()

C16, C17, C21 = (1, 6, 20), (1, 7, 24), (2, 1, 9)
DEFAULT = ct.RuntimeSettings()

V2_CONFIG = """\
version = 2
root = "/var/lib/containerd"
oom_score = -999

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.9"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = true
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia.options]
          BinaryName = "/usr/bin/nvidia-container-runtime"
          SystemdCgroup = true
  [plugins."io.containerd.internal.v1.opt"]
    path = "/opt/containerd"  # trailing comment kept
"""

V3_CONFIG = """\
version = 3
root = "/var/lib/containerd"

[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = "registry.k8s.io/pause:3.10"

[plugins.'io.containerd.cri.v1.runtime'.containerd]
  default_runtime_name = "runc"

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
  SystemdCgroup = false
"""

V1_CONFIG = """\
root = "/var/lib/containerd"
[plugins.cri]
  sandbox_image = "k8s.gcr.io/pause:3.2"
[plugins.cri.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
"""


def entry(parsed, schema):
    cur = parsed
    for k in ct.runtime_path(schema):
        cur = cur[k]
    return cur


def without_ours(parsed, schema):
    return ct._remove(parsed, ct.runtime_path(schema))
