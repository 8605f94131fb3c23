"""Which log lines are incidents: the built-in rules, as data, with the real lines they match.

Every example and every line in NOT_INCIDENTS was copied from the program's own output as
quoted in its source or issue tracker (see each rule's `source`); tests run them all.
docs/detector.md is the readable table of this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from supervisor.core.runtimes.spec import Runtime


class IncidentClass(StrEnum):
    VRAM_OOM = "vram_oom"  # the GPU ran out of memory: step down after repeated incidents
    GPU_FAULT = "gpu_fault"  # the GPU or its driver failed: restart or cordon, never step down
    HOST_OOM = "host_oom"  # host RAM ran out (cgroup/kernel OOM): not a VRAM problem
    # The runtime refused to start for a cause it names (too little shared memory, a bad
    # flag): reported with that cause, never a step down; a restart cannot fix it.
    START_FAILURE = "start_failure"
    # A server stopped by itself (exit 0, nobody asked): restarted with the decaying
    # backoff, never a step down.
    CRASH = "crash"
    # A container exited non-zero with no line fleetd knows to explain it: restarted with
    # the decaying backoff, never a step down; its last lines are kept for a rule to come.
    CRASH_LOOP = "crash_loop"


KNOWN_RUNTIMES = frozenset(r.value for r in Runtime)  # the registry's (supervisor.core.runtimes)


@dataclass(frozen=True)
class Rule:
    id: str  # stable, e.g. "llamacpp.cuda_malloc_failed"
    incident_class: IncidentClass
    pattern: str  # a Python regex, searched (re.search) in one log line
    # Whose wording it is: None for any runtime's, else a subset of KNOWN_RUNTIMES. Every rule
    # applies to every service; a service of one of these runtimes tries the rule first.
    runtimes: frozenset[str] | None
    description: str  # one line for the docs table
    examples: tuple[str, ...]  # real lines that must match
    source: str  # where the wording comes from (repo/file or issue URL)


_OLLAMA = frozenset({"ollama"})
_VLLM = frozenset({"vllm"})
_LLAMACPP = frozenset({"llamacpp"})
_TGI = frozenset({"tgi"})
_SGLANG = frozenset({"sglang"})
_TENSORRT = frozenset({"tensorrt", "triton"})  # TensorRT-LLM also runs inside Triton
_TRITON = frozenset({"triton"})

_GH = "https://github.com"

# Order inside a class is the order rules are tried; the classes themselves are tried
# gpu_fault, then host_oom, then vram_oom (see supervisor/detector.py).
GPU_FAULT_RULES: tuple[Rule, ...] = (
    Rule(
        id="nvidia.xid",
        incident_class=IncidentClass.GPU_FAULT,
        # Not the NVLink events the driver itself calls Nonfatal (Xid 144-150 carry the word).
        pattern=r"NVRM: Xid \(PCI:[0-9A-Fa-f:.]+\): \d+(?!\d|, \S+ Nonfatal )",
        runtimes=None,
        description="NVIDIA kernel driver Xid report (any code but a non-fatal NVLink event)",
        examples=(
            "NVRM: Xid (PCI:0000:44:00): 79, GPU has fallen off the bus",
            "[ 1399.140323] NVRM: Xid (PCI:0000:01:00): 32, Channel ID 00000009 intr 00800000",
            "NVRM: Xid (PCI:0019:01:00): 149, NETIR Fatal XC0 i0 Link -1 (0x000fe406 0x00000000"
            " 0x00000000 0x00000000 0x00000000 0x00000000)",
        ),
        source=(
            f"{_GH}/NVIDIA/NVSentinel/issues/155; Ubuntu forum post 'gnome-shell freezes'"
            f" (2019-03-31); NVIDIA Xid catalogue (docs.nvidia.com); {_GH}/leptonai/gpud/pull/1174"
        ),
    ),
    Rule(
        id="nvidia.fallen_off_bus",
        incident_class=IncidentClass.GPU_FAULT,
        pattern=r"fallen off the bus",
        runtimes=None,
        description="the kernel driver lost the GPU (multi-line form without an Xid)",
        examples=("               NVRM: fallen off the bus and is not responding to commands.",),
        source=f"{_GH}/NVIDIA/NVSentinel/issues/155",
    ),
    Rule(
        id="nvml.init_failed",
        incident_class=IncidentClass.GPU_FAULT,
        pattern=r"Failed to initialize NVML: ",
        runtimes=None,
        description="NVML unusable in the container (lost device cgroup, driver mismatch)",
        examples=("Failed to initialize NVML: Unknown Error",),
        source=f"{_GH}/NVIDIA/nvidia-docker/issues/1671",
    ),
    Rule(
        id="cuda.illegal_address",
        incident_class=IncidentClass.GPU_FAULT,
        pattern=r"an illegal memory access was encountered|cudaErrorIllegalAddress",
        runtimes=None,
        description="CUDA illegal memory access: the CUDA context is dead, memory is not full",
        examples=(
            "ERROR 09-27 06:46:46 engine.py:157] RuntimeError: CUDA error: an illegal memory"
            " access was encountered",
            "[rank2]:[E626 23:10:17.921506443 ProcessGroupNCCL.cpp:1896] [PG ID 2 PG GUID 3"
            " Rank 2] Process group watchdog thread terminated with exception: CUDA error: an"
            " illegal memory access was encountered",
        ),
        source=f"{_GH}/vllm-project/vllm/issues/6976; {_GH}/vllm-project/vllm/issues/20170",
    ),
    Rule(
        id="cuda.launch_failure",
        incident_class=IncidentClass.GPU_FAULT,
        pattern=r"unspecified launch failure|cudaErrorLaunchFailure",
        runtimes=None,
        description="CUDA unspecified launch failure (kernel crash, often hardware or driver)",
        examples=(
            "Error: an error was encountered while running the model: CUDA error: unspecified"
            " launch failure",
            "Error: llama runner process has terminated: CUDA error: unspecified launch failure",
        ),
        source=f"{_GH}/ollama/ollama/issues/9247; {_GH}/ollama/ollama/issues/6836",
    ),
    Rule(
        id="cuda.ecc_uncorrectable",
        incident_class=IncidentClass.GPU_FAULT,
        pattern=(
            r"uncorrectable ECC error encountered|cudaErrorECCUncorrectable"
            r"|CUDA_ERROR_ECC_UNCORRECTABLE"
        ),
        runtimes=None,
        description="uncorrectable ECC error: failing GPU memory",
        examples=(
            "RuntimeError: CUDA error: uncorrectable ECC error encountered",
            "RuntimeError: cuda runtime error (39) : uncorrectable ECC error encountered at"
            " /pytorch/aten/src/THC/THCCachingHostAllocator.cpp:265",
        ),
        source=(
            f"{_GH}/vllm-project/vllm/issues/5222; {_GH}/NVIDIA/semantic-segmentation/issues/33"
        ),
    ),
    Rule(
        id="cuda.driver_insufficient",
        incident_class=IncidentClass.GPU_FAULT,
        pattern=r"CUDA driver version is insufficient for CUDA runtime version",
        runtimes=None,
        description="host driver too old for the image's CUDA runtime (or GPU not passed in)",
        examples=(
            "ggml_cuda_init: failed to initialize CUDA: CUDA driver version is insufficient for"
            " CUDA runtime version",
            "W0816 16:43:33.649654 127 pinned_memory_manager.cc:236] Unable to allocate pinned"
            " system memory, pinned memory pool will not be available: CUDA driver version is"
            " insufficient for CUDA runtime version",
        ),
        source=f"{_GH}/ollama/ollama/issues/7666; {_GH}/InternLM/lmdeploy/issues/263",
    ),
    Rule(
        id="cuda.no_device",
        incident_class=IncidentClass.GPU_FAULT,
        pattern=r"no CUDA-capable device is detected|invalid device ordinal",
        runtimes=None,
        description="the GPU the service expects is not visible to it",
        examples=(
            "ggml_cuda_init: failed to initialize CUDA: no CUDA-capable device is detected",
            "[TensorRT-LLM][ERROR] CUDA runtime error in cudaSetDevice(device): invalid device"
            " ordinal"
            " (/app/tensorrt_llm/cpp/tensorrt_llm/runtime/utils/sessionUtils.cpp:34)",
        ),
        source=f"{_GH}/abetlen/llama-cpp-python/issues/1890; {_GH}/NVIDIA/TensorRT-LLM/issues/1556",
    ),
    Rule(
        id="llamacpp.cuda_init_failed",
        incident_class=IncidentClass.GPU_FAULT,
        pattern=r"ggml_cuda_init: failed to initialize CUDA: ",
        runtimes=_LLAMACPP,
        description="ggml could not initialise CUDA (any reason): the server runs without the GPU",
        examples=("llama-cpp    | ggml_cuda_init: failed to initialize CUDA: unknown error",),
        source=f"{_GH}/ggml-org/llama.cpp/issues/1866",
    ),
    Rule(
        id="vulkan.device_lost",
        incident_class=IncidentClass.GPU_FAULT,
        pattern=r"vk::DeviceLostError",
        runtimes=None,
        description="the Vulkan device was lost (llama.cpp's Vulkan backend): its context is dead",
        examples=("terminate called after throwing an instance of 'vk::DeviceLostError'",),
        source=f"{_GH}/ggml-org/llama.cpp/issues/13248",
    ),
    Rule(
        id="docker.gpu_driver_missing",
        incident_class=IncidentClass.GPU_FAULT,
        pattern=r'could not select device driver (?:"[^"]*" )?with capabilities: \[\[gpu\]\]',
        runtimes=None,
        description="Docker cannot give the container a GPU (no NVIDIA container runtime)",
        examples=(
            'docker: Error response from daemon: could not select device driver "" with'
            " capabilities: [[gpu]].",
            'Error response from daemon: could not select device driver "nvidia" with capabilities:'
            " [[gpu]]",
            "docker: Error response from daemon: could not select device driver with capabilities:"
            " [[gpu]].",
        ),
        source=(
            f"{_GH}/NVIDIA/nvidia-docker/issues/1352; {_GH}/infiniflow/ragflow/issues/9573;"
            f" {_GH}/NVIDIA/nvidia-docker/issues/1642"
        ),
    ),
    Rule(
        id="ollama.no_gpu",
        incident_class=IncidentClass.GPU_FAULT,
        pattern=r'msg="no compatible GPUs were discovered"|msg="no nvidia devices detected"',
        runtimes=_OLLAMA,
        description="Ollama found no usable GPU and will run on the CPU",
        examples=(
            'time=2025-04-29T20:11:09.132Z level=INFO source=gpu.go:377 msg="no compatible GPUs'
            ' were discovered"',
            'time=2024-09-17T15:04:08.215Z level=INFO source=gpu.go:560 msg="no nvidia devices'
            ' detected" library=/usr/lib/x86_64-linux-gnu/libcuda.so.550.107.02',
        ),
        source=f"{_GH}/claraverse-space/ClaraVerse/issues/49; {_GH}/ollama/ollama/issues/6840",
    ),
)

HOST_OOM_RULES: tuple[Rule, ...] = (
    Rule(
        id="kernel.oom_kill",
        incident_class=IncidentClass.HOST_OOM,
        pattern=(
            r"(?:Memory cgroup out|Out) of memory: Kill(?:ed)? process \d+"
            r"|oom_reaper: reaped process \d+"
        ),
        runtimes=None,
        description="the kernel OOM killer (global or cgroup) killed a process",
        examples=(
            "May 15 23:09:27 ubuntu-s-1vcpu-2gb-ams3-01 kernel: [  514.682838] Memory cgroup out"
            " of memory: Killed process 15617 (python3) total-vm:11892kB, anon-rss:4292kB,"
            " file-rss:3428kB, shmem-rss:0kB",
            "May 15 23:09:30 ubuntu-s-1vcpu-2gb-ams3-01 kernel: [  518.050606] Out of memory:"
            " Killed process 15784 (python3) total-vm:11964kB, anon-rss:4288kB, file-rss:3028kB,"
            " shmem-rss:0kB",
            "May 07 21:43:54 doom kernel: Out of memory: Kill process 27438 (R) score 31 or"
            " sacrifice child",
            "May 15 23:09:27 ubuntu-s-1vcpu-2gb-ams3-01 kernel: [  514.686093] oom_reaper: reaped"
            " process 15617 (python3), now anon-rss:0kB, file-rss:0kB, shmem-rss:0kB",
        ),
        source=f"{_GH}/docker/for-linux/issues/1001; {_GH}/genular/pandora/issues/49",
    ),
    Rule(
        id="kernel.oom_invoked",
        incident_class=IncidentClass.HOST_OOM,
        pattern=r"invoked oom-killer: ",
        runtimes=None,
        description="first line of a kernel OOM report",
        examples=(
            "Jun 13 23:04:43 kir-ce75-gd kernel: python invoked oom-killer: gfp_mask=0xd0,"
            " order=0, oom_score_adj=0",
        ),
        source=f"{_GH}/moby/moby/issues/38613",
    ),
    Rule(
        id="kernel.oom_constraint",
        incident_class=IncidentClass.HOST_OOM,
        pattern=r"oom-kill:constraint=CONSTRAINT_",
        runtimes=None,
        description="kernel OOM summary line naming the killed task and its memory cgroup",
        examples=(
            "2024-04-29T14:55:41,679685+02:00 oom-kill:constraint=CONSTRAINT_NONE,"
            "nodemask=(null),cpuset=/,mems_allowed=0,global_oom,task_memcg=/user.slice/"
            "user-21417.slice/user@21417.service,task=perl,pid=1440763,uid=21417",
        ),
        source=f"{_GH}/equinor/ert/issues/7797",
    ),
    Rule(
        id="dockerd.task_oom",
        incident_class=IncidentClass.HOST_OOM,
        pattern=r"topic=/tasks/oom\b",
        runtimes=None,
        description="dockerd's log of a container's cgroup OOM (the engine's `oom` event)",
        examples=(
            'Jun 13 23:04:43 kir-ce75-gd dockerd[9931]: time="2019-06-13T23:04:43.101748600Z"'
            " level=debug msg=event module=libcontainerd namespace=moby topic=/tasks/oom",
        ),
        source=f"{_GH}/moby/moby/issues/38613",
    ),
    Rule(
        id="systemd.oom_kill",
        incident_class=IncidentClass.HOST_OOM,
        pattern=r"Failed with result 'oom-kill'",
        runtimes=None,
        description="systemd reports a unit ended by the OOM killer",
        examples=("nixos systemd[1]: ollama.service: Failed with result 'oom-kill'.",),
        source=f"{_GH}/ollama/ollama/issues/11231",
    ),
    Rule(
        id="shell.killed",
        incident_class=IncidentClass.HOST_OOM,
        pattern=r"^\s*Killed\s*$",
        runtimes=None,
        description="a shell's whole-line `Killed` for a SIGKILLed child (the OOM killer's)",
        examples=("Killed",),
        source=f"{_GH}/equinor/ert/issues/7797",
    ),
    Rule(
        id="cpp.bad_alloc",
        incident_class=IncidentClass.HOST_OOM,
        pattern=r"std::bad_alloc",
        runtimes=None,
        description="a C++ program (llama.cpp, TensorRT-LLM) failed a host allocation",
        examples=(
            "terminate called after throwing an instance of 'std::bad_alloc'",
            "  what():  std::bad_alloc",
        ),
        source=f"{_GH}/ggml-org/llama.cpp/issues/4928",
    ),
    Rule(
        id="torch.cpu_alloc",
        incident_class=IncidentClass.HOST_OOM,
        pattern=r"DefaultCPUAllocator: (?:not enough memory|can't allocate memory)",
        runtimes=None,
        description="PyTorch could not allocate host RAM",
        examples=(
            "RuntimeError: [enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not"
            " enough memory: you tried to allocate 31850496000 bytes.",
            "RuntimeError: [enforce fail at alloc_cpu.cpp:75] err == 0. DefaultCPUAllocator:"
            " can't allocate memory: you tried to allocate 132426121216 bytes. Error code 12"
            " (Cannot allocate memory)",
        ),
        source=(
            f"{_GH}/Comfy-Org/Nvidia_RTX_Nodes_ComfyUI/issues/13; {_GH}/mxfold/mxfold2/issues/20"
        ),
    ),
    Rule(
        id="python.memory_error",
        incident_class=IncidentClass.HOST_OOM,
        pattern=r"(?:^|[\s\]])(?:\w+\.)*MemoryError(?::|\s*$)",
        runtimes=None,
        description="Python's MemoryError (host RAM), never torch's OutOfMemoryError",
        examples=("MemoryError",),
        source="https://docs.python.org/3/library/exceptions.html#MemoryError",
    ),
    Rule(
        id="llamacpp.cpu_alloc_failed",
        incident_class=IncidentClass.HOST_OOM,
        pattern=(
            r"ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer"
            r"|failed to allocate CPU buffer"
            r"|error loading model: (?:mmap failed: Cannot allocate memory"
            r"|unable to allocate CPU buffer)"
        ),
        runtimes=_LLAMACPP,
        description="llama.cpp could not allocate a host (CPU) buffer",
        examples=(
            "ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer of size"
            " 137438953504",
            "ggml_gallocr_reserve_n: failed to allocate CPU buffer of size 84940800",
            "llama_model_load: error loading model: mmap failed: Cannot allocate memory",
            "llama_model_load: error loading model: unable to allocate CPU buffer",
        ),
        source=(
            f"{_GH}/ggml-org/llama.cpp/issues/8101; {_GH}/mozilla-ai/llamafile/issues/501; "
            "llama-server 0.7.0 (Debian) under `ulimit -v`: tests/data/llamacpp/fail-*.log"
        ),
    ),
    Rule(
        id="ollama.system_memory",
        incident_class=IncidentClass.HOST_OOM,
        pattern=r"model requires more system memory \(",
        runtimes=_OLLAMA,
        description="Ollama refused a load: not enough host RAM (container limit or host)",
        examples=(
            "Error: model requires more system memory (164.8 GiB) than is available (13.4 GiB)",
        ),
        source=f"{_GH}/ollama/ollama/issues/10920",
    ),
)

VRAM_OOM_RULES: tuple[Rule, ...] = (
    Rule(
        id="torch.cuda_oom",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=r"(?:CUDA|HIP) out of memory\. |would exceed allowed memory\. \(out of memory\)",
        runtimes=None,
        description="PyTorch's caching allocator (CUDA, or HIP on ROCm) ran out of VRAM",
        examples=(
            "(VllmWorker rank=1 pid=194255) ERROR 05-08 14:46:12 [multiproc_executor.py:435]"
            " torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 270.00 MiB. GPU 1"
            " has a total capacity of 21.98 GiB of which 156.94 MiB is free. Including"
            " non-PyTorch memory, this process has 21.80 GiB memory in use. Of the allocated"
            " memory 21.42 GiB is allocated by PyTorch, and 24.12 MiB is reserved by PyTorch but"
            " unallocated. If reserved but unallocated memory is large try setting"
            " PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See"
            " documentation for Memory Management "
            " (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)",
            "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 128.00 MiB (GPU"
            " 0; 15.77 GiB total capacity; 15.37 GiB already allocated; 13.62 MiB free; 15.77"
            " GiB allowed; 15.40 GiB reserved in total by PyTorch) If reserved memory is >>"
            " allocated memory try setting max_split_size_mb to avoid fragmentation.  See"
            " documentation for Memory Management and PYTORCH_CUDA_ALLOC_CONF",
            "thread 'main' panicked at 'Unable to warmup model: Generation(\"Allocation on"
            " device 0 would exceed allowed memory. (out of memory)\\nCurrently allocated     :"
            " 16.08 GiB\\nRequested               : 4.83 GiB\\nDevice limit            : 22.20"
            " GiB\\nFree (according to CUDA): 11.12 MiB\\nPyTorch limit (set by user-supplied"
            " memory fraction)\\n                        : 22.20 GiB\")', router/src/main.rs:"
            "216:18",
            "torch.OutOfMemoryError: HIP out of memory. Tried to allocate 16.00 GiB. GPU 0 has a"
            " total capacity of 15.24 GiB of which 15.09 GiB is free. Of the allocated memory 0"
            " bytes is allocated by PyTorch, and 0 bytes is reserved by PyTorch but unallocated. If"
            " reserved but unallocated memory is large try setting"
            " PYTORCH_HIP_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See"
            " documentation for Memory Management "
            " (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)",
        ),
        source=(
            f"{_GH}/ROCm/TheRock/issues/1054; {_GH}/vllm-project/vllm/issues/17835;"
            f" {_GH}/huggingface/text-generation-inference/issues/866;"
            f" {_GH}/huggingface/text-generation-inference/issues/563"
        ),
    ),
    Rule(
        id="cuda.error_oom",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=r"CUDA error(?: \d+ at \S+)?: out of memory",
        runtimes=None,
        description="a CUDA call failed with out of memory (PyTorch, ggml CUDA_CHECK)",
        examples=(
            "Error: llama runner process has terminated: CUDA error: out of memory",
            "CUDA error 2 at /data/llama.cpp/ggml-cuda.cu:5509: out of memory",
        ),
        source=f"{_GH}/ollama/ollama/issues/9782; {_GH}/ggml-org/llama.cpp/issues/3199",
    ),
    Rule(
        id="cublas.alloc_failed",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=r"CUBLAS_STATUS_ALLOC_FAILED",
        runtimes=None,
        description="cuBLAS could not allocate its workspace in VRAM",
        examples=(
            "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling"
            " `cublasCreate(handle)`",
        ),
        source=f"{_GH}/QwenLM/Qwen3/issues/873",
    ),
    Rule(
        id="cudnn.alloc_failed",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=r"CUDNN_STATUS_ALLOC_FAILED",
        runtimes=None,
        description="cuDNN could not allocate its handle or workspace in VRAM",
        examples=(
            "Could not create cudnn handle: CUDNN_STATUS_ALLOC_FAILED",
            "mxnet.base.MXNetError: [16:26:09] src/operator/nn/./cudnn/cudnn_convolution-inl.h:713:"
            " Check failed: e == CUDNN_STATUS_SUCCESS (2 vs. 0) cuDNN: CUDNN_STATUS_ALLOC_FAILED",
        ),
        source=f"{_GH}/tensorflow/tensorflow/issues/39989; {_GH}/ElegantGod/SSHA/issues/5",
    ),
    Rule(
        id="onnxruntime.cuda_failure_oom",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=r"CUDA failure 2: out of memory",
        runtimes=None,
        description="ONNX Runtime's (and CNTK's) CUDA call check: cudaErrorMemoryAllocation",
        examples=(
            "Processing:  99%|▉| 1732/1744 [08:43<00:03,  3.79frame/s,"
            " execution_providers=['CUDAExecutionProvider'], execution_thre[ONNXRuntimeError] : 1 :"
            " FAIL : D:\\a\\_work\\1\\s\\onnxruntime\\core\\providers\\cuda\\cuda_call.cc:121"
            " onnxruntime::CudaCall"
            " D:\\a\\_work\\1\\s\\onnxruntime\\core\\providers\\cuda\\cuda_call.cc:114"
            " onnxruntime::CudaCall CUDA failure 2: out of memory ; GPU=0 ;"
            " hostname=DESKTOP-QUBEI ;"
            " file=D:\\a\\_work\\1\\s\\onnxruntime\\core\\providers\\cuda\\cuda_stream_handle.cc ;"
            " line=175 ; expr=cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);",
            "CUDA failure 2: out of memory ; GPU=0 ; hostname=MSI ; expr=cudaMalloc((void**)"
            " &deviceBufferPtr, sizeof(AllocatedElemType) * numElements)",
        ),
        source=f"{_GH}/hacksider/Deep-Live-Cam/issues/584; {_GH}/microsoft/CNTK/issues/1769",
    ),
    Rule(
        id="xla.resource_exhausted",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=(
            r"(?:RESOURCE_EXHAUSTED|Resource exhausted): Out of memory"
            r" (?:while trying to allocate|allocating) \d+ bytes"
        ),
        runtimes=None,
        description="XLA (JAX, TensorFlow with XLA) could not allocate device memory",
        examples=(
            "jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying"
            " to allocate 6291456 bytes.",
            "RuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 14285187448"
            " bytes.",
            "jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory allocating"
            " 20029400304 bytes.",
            "  (0) Resource exhausted: Out of memory while trying to allocate 68852648264 bytes.",
        ),
        source=(
            f"{_GH}/jax-ml/jax/issues/13428; {_GH}/sokrypton/ColabFold/issues/65;"
            f" {_GH}/onpix/LLNeRF/issues/9; {_GH}/NVIDIA/DeepLearningExamples/issues/405"
        ),
    ),
    Rule(
        id="tensorflow.oom_tensor",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=(
            r"OOM when allocating tensor with shape\[[^\]]*\] and type \w+"
            r" on \S*device:GPU:\d+"
        ),
        runtimes=None,
        description="TensorFlow could not allocate a tensor on a GPU (ResourceExhaustedError)",
        examples=(
            "OOM when allocating tensor with shape[3,3,512,1024] and type float on"
            " /job:localhost/replica:0/task:0/device:GPU:0 by allocator GPU_0_bfc [Op:Mul]",
        ),
        source=f"{_GH}/tensorflow/tensorflow/issues/47820",
    ),
    Rule(
        id="deepspeed.workspace_oom",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=r"Workspace can't be allocated, not? enough memory",
        runtimes=None,
        description="DeepSpeed-Inference's kernels could not allocate their VRAM workspace",
        examples=(
            "RuntimeError: Workspace can't be allocated, no enough memory.",
            "RuntimeError: Workspace can't be allocated, not enough memory",
        ),
        source=(
            f"{_GH}/daswer123/xtts-webui/issues/25; deepspeedai/DeepSpeed"
            " csrc/transformer/inference/includes/inference_context.h"
        ),
    ),
    Rule(
        id="nccl.cuda_oom",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=r"NCCL WARN Cuda failure (?:\d+ )?'out of memory'",
        runtimes=None,
        description="NCCL (tensor parallelism) could not allocate its VRAM buffers",
        examples=(
            "VM-0-16-ubuntu:392:494 [2] enqueue.cc:43 NCCL WARN Cuda failure 'out of memory'",
            "ng30903:3063028:3066152 [3] include/alloc.h:178 NCCL WARN Cuda failure 'out of"
            " memory'",
        ),
        source=f"{_GH}/NVIDIA/TensorRT-LLM/issues/1670; {_GH}/NVIDIA/nccl/issues/1235",
    ),
    Rule(
        id="llamacpp.cuda_malloc_failed",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=r"cudaMalloc failed: out of memory",
        runtimes=_LLAMACPP,
        description="ggml's CUDA backend could not allocate a buffer",
        examples=(
            "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 144817.04 MiB on device 0:"
            " cudaMalloc failed: out of memory",
            "deep-seek-1  | ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9866.00 MiB"
            " on device 1: cudaMalloc failed: out of memory",
        ),
        source=f"{_GH}/ggml-org/llama.cpp/issues/20431; {_GH}/ggml-org/llama.cpp/issues/11476",
    ),
    Rule(
        id="llamacpp.buffer_alloc_failed",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=r"failed to allocate (?:CUDA|ROCm)\d+ buffer",
        runtimes=_LLAMACPP,
        description="llama.cpp could not place weights, KV cache or compute graph in VRAM",
        examples=(
            "alloc_tensor_range: failed to allocate CUDA0 buffer of size 151851674624",
            "ggml_gallocr_reserve_n: failed to allocate CUDA1 buffer of size 10345253120",
            "1.06.520.084 E ggml_gallocr_reserve_n_impl: failed to allocate CUDA1 buffer of size"
            " 54262464512",
        ),
        source=(
            f"{_GH}/ggml-org/llama.cpp/issues/20431; {_GH}/ggml-org/llama.cpp/issues/11476;"
            f" {_GH}/ggml-org/llama.cpp/pull/26297"
        ),
    ),
    Rule(
        id="llamacpp.model_load_alloc",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=r"error loading model: unable to allocate (?:(?:CUDA|ROCm)\d+|backend) buffer",
        runtimes=_LLAMACPP,
        description="llama.cpp gave up loading the model: a device buffer did not fit",
        examples=(
            "llama_model_load: error loading model: unable to allocate CUDA0 buffer",
            "llama_model_load: error loading model: unable to allocate backend buffer",
        ),
        source=f"{_GH}/ggml-org/llama.cpp/issues/20431; {_GH}/ggml-org/llama.cpp/issues/7366",
    ),
    Rule(
        id="llamacpp.vulkan_alloc_failed",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=r"ggml_vulkan: Device memory allocation of size \d+ failed",
        runtimes=_LLAMACPP,
        description="ggml's Vulkan backend could not allocate device memory",
        examples=(
            "ggml_vulkan: Device memory allocation of size 369827840 failed.",
            "ggml_vulkan: Device memory allocation of size 3959422976 failed.",
        ),
        source=f"{_GH}/ggml-org/llama.cpp/issues/29270; {_GH}/ggml-org/llama.cpp/issues/12817",
    ),
    Rule(
        id="vulkan.out_of_device_memory",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=r"VK_ERROR_OUT_OF_DEVICE_MEMORY",
        runtimes=None,
        description="a Vulkan driver reported the device out of memory",
        examples=(
            "iconda\\envs\\mlc-llm-build\\conda-bld\\mlc-chat-cli-nightly-package_1694754606949"
            "\\work\\3rdparty\\tvm\\src\\runtime\\vulkan\\vulkan_buffer.cc:61: InternalError: Check"
            " failed: (__e == VK_SUCCESS) is false: Vulkan Error, code=-2:"
            " VK_ERROR_OUT_OF_DEVICE_MEMORY",
        ),
        source=f"{_GH}/mlc-ai/mlc-llm/issues/974",
    ),
    Rule(
        id="ollama.runner_oom",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=(
            r"llama runner process has terminated: .*?(?:cudaMalloc failed: out of memory"
            r"|unable to allocate (?:(?:CUDA|ROCm)\d+|backend) buffer)"
        ),
        runtimes=_OLLAMA,
        description="Ollama's model runner died on a VRAM allocation while loading",
        examples=(
            'time=2025-04-29T12:31:28.521+02:00 level=ERROR source=sched.go:457 msg="error'
            ' loading llama server" error="llama runner process has terminated: cudaMalloc'
            " failed: out of memory\\nggml_gallocr_reserve_n: failed to allocate CUDA0 buffer of"
            ' size 838447104"',
            'time=2025-03-07T06:24:27.786Z level=ERROR source=sched.go:456 msg="error loading'
            ' llama server" error="llama runner process has terminated: error loading model:'
            " unable to allocate CUDA0 buffer\\nllama_model_load_from_file_impl: failed to load"
            ' model"',
            "Error: llama runner process has terminated: error loading model: unable to allocate"
            " backend buffer",
        ),
        source=(
            f"{_GH}/ollama/ollama/issues/9782; {_GH}/ollama/ollama/issues/9562;"
            f" {_GH}/ollama/ollama/issues/5958"
        ),
    ),
    Rule(
        id="ollama.memory_layout",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=r"memory layout cannot be allocated",
        runtimes=_OLLAMA,
        description="Ollama (new memory manager) found no layout of the model that fits",
        examples=("memory layout cannot be allocated with num_gpu = 26",),
        source=f"{_GH}/ollama/ollama/issues/14980; {_GH}/ollama/ollama/issues/12612",
    ),
    Rule(
        id="vllm.no_cache_blocks",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=r"No available memory for the cache blocks",
        runtimes=_VLLM,
        description="vLLM: the weights left no VRAM for the KV cache",
        examples=(
            "vllm-1  | ERROR 11-18 18:07:28 engine.py:366] ValueError: No available memory for"
            " the cache blocks. Try increasing `gpu_memory_utilization` when initializing the"
            " engine.",
        ),
        source=f"{_GH}/vllm-project/vllm/issues/10439",
    ),
    Rule(
        id="vllm.kv_cache_max_seq_len",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=(
            r"max seq len \(\d+\) is larger than the maximum number of tokens that can be stored"
            r" in KV cache"
        ),
        runtimes=_VLLM,
        description="vLLM (V0): the KV cache left over cannot hold one max-length sequence",
        examples=(
            "ValueError: The model's max seq len (32768) is larger than the maximum number of"
            " tokens that can be stored in KV cache (7344). Try increasing"
            " `gpu_memory_utilization` or decreasing `max_model_len` when initializing the"
            " engine.",
        ),
        source=f"{_GH}/QwenLM/Qwen3/issues/295; {_GH}/vllm-project/vllm/pull/2163",
    ),
    Rule(
        id="vllm.kv_cache_insufficient",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=r"KV cache is needed, which is larger than the available KV cache memory",
        runtimes=_VLLM,
        description="vLLM (V1): the KV cache left over cannot hold one max-length sequence",
        examples=(
            "ValueError: To serve at least one request with the models's max seq len (131072),"
            " (16.00 GiB KV cache is needed, which is larger than the available KV cache memory"
            " (0.71 GiB). Based on the available memory, the estimated maximum model length is"
            " 5632. Try increasing `gpu_memory_utilization` or decreasing `max_model_len` when"
            " initializing the engine.",
        ),
        source=f"{_GH}/vllm-project/tpu-inference/pull/223 (vllm/v1/core/kv_cache_utils.py)",
    ),
    Rule(
        id="vllm.startup_free_memory",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=r"on startup is less than desired GPU memory utilization",
        runtimes=_VLLM,
        description="vLLM: less VRAM free at start than gpu_memory_utilization asks for",
        examples=(
            "ValueError: Free memory on device (67.24/79.25 GiB) on startup is less than desired"
            " GPU memory utilization (0.9, 71.33 GiB). Decrease GPU memory utilization or reduce"
            " GPU memory used by other processes.",
        ),
        source=f"{_GH}/ovg-project/kvcached/issues/110; {_GH}/vllm-project/vllm/issues/20305",
    ),
    Rule(
        id="vllm.sampler_warmup_oom",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=r"CUDA out of memory occurred when warming up",
        runtimes=_VLLM,
        description="vLLM (V1): out of VRAM while warming up the sampler",
        examples=(
            "ERROR 03-20 02:29:07 [core.py:340] RuntimeError: CUDA out of memory occurred when"
            " warming up sampler with 1024 dummy requests. Please try lowering `max_num_seqs` or"
            " `gpu_memory_utilization` when initializing the engine.",
        ),
        source=f"{_GH}/vllm-project/vllm/issues/15105",
    ),
    Rule(
        id="tgi.warmup_oom",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=(
            r"Not enough memory to (?:handle \d+ (?:total |prefill )?tokens|warmup )"
            r"|NotEnoughMemory\(\d+\)"
        ),
        runtimes=_TGI,
        description="TGI: the warm-up batch, or max_total_tokens, did not fit in VRAM",
        examples=(
            "ERROR warmup{max_input_length=64 max_prefill_tokens=256}:warmup:"
            " text_generation_client: router/client/src/lib.rs:33: Server error: Not enough"
            " memory to handle 256 prefill tokens. You need to decrease",
            "Not enough memory to handle 16000 total tokens with 2 prefill tokens. You need to"
            " decrease `--max-batch-total-tokens` or `--max-batch-prefill-tokens",
            "Error: Backend(NotEnoughMemory(64))",
        ),
        source=(
            f"{_GH}/huggingface/text-generation-inference/issues/1164;"
            f" {_GH}/huggingface/text-generation-inference/issues/710;"
            " server/text_generation_server/models/flash_causal_lm.py;"
            f" {_GH}/huggingface/optimum-tpu/issues/148 (backends/v3/src/lib.rs)"
        ),
    ),
    Rule(
        id="sglang.mem_fraction",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=(
            r"Not enough memory\. Please try to increase --mem-fraction-static"
            r"|leave no GPU memory for the KV cache"
        ),
        runtimes=_SGLANG,
        description="SGLang: the weights left no VRAM for the KV cache pool",
        examples=(
            "RuntimeError: Not enough memory. Please try to increase --mem-fraction-static.",
            "ValueError: Loaded weights leave no GPU memory for the KV cache under"
            " --mem-fraction-static=0.88.",
        ),
        source=(
            f"{_GH}/sgl-project/sglang/issues/4330;"
            " python/sglang/srt/model_executor/model_runner.py;"
            f" {_GH}/SemiAnalysisAI/InferenceX/issues/2128"
        ),
    ),
    Rule(
        id="sglang.batch_oom",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=r"(?:Prefill|Decode) out of memory\. Try to lower your batch size",
        runtimes=_SGLANG,
        description="SGLang: the KV cache pool ran out for a batch and the scheduler stopped",
        examples=(
            "RuntimeError: Decode out of memory. Try to lower your batch size.",
            "RuntimeError: Prefill out of memory. Try to lower your batch size.",
        ),
        source=f"{_GH}/sgl-project/sglang/issues/4602; {_GH}/sgl-project/sglang-jax/issues/1360",
    ),
    Rule(
        id="tensorrt.cuda_runtime_oom",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=r"\[TensorRT-LLM\]\[ERROR\] CUDA runtime error in .*: out of memory",
        runtimes=_TENSORRT,
        description="TensorRT-LLM could not allocate VRAM (also via Triton's backend)",
        examples=(
            "RuntimeError: [TensorRT-LLM][ERROR] CUDA runtime error in error: out of memory"
            " (/home/jenkins/agent/workspace/LLM/main/L0_PostMerge/tensorrt_llm/cpp/"
            "tensorrt_llm/runtime/ipcUtils.cpp:48)",
            "Model 'tensorrt_llm' loading failed with error: version 1 is at UNAVAILABLE state:"
            " Internal: unexpected error when creating modelInstanceState: [TensorRT-LLM][ERROR]"
            " CUDA runtime error in ::cudaMallocAsync(ptr, n, mCudaStream->get()): out of memory"
            " (/app/tensorrt_llm/cpp/tensorrt_llm/runtime/tllmBuffers.h:112)",
        ),
        source=(
            f"{_GH}/NVIDIA/TensorRT-LLM/issues/1060;"
            f" {_GH}/triton-inference-server/tensorrtllm_backend/issues/281"
        ),
    ),
    Rule(
        id="tensorrt.engine_oom",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=(
            r"Error Code 1: Cuda Runtime \(out of memory\)|Error Code 2: OutOfMemory"
            r"|Cuda Error in \S+ 2 \(out of memory\)"
        ),
        runtimes=_TENSORRT,
        description="TensorRT could not allocate VRAM for an engine or execution context",
        examples=(
            "[05/08/2024-20:47:56] [TRT] [E] 1: [defaultAllocator.cpp::allocate::19] Error Code"
            " 1: Cuda Runtime (out of memory)",
            "2026-05-01 00:04:05,399 - torch_tensorrt [TensorRT Conversion Context] - ERROR -"
            " [executionContext.cpp::initializeExecutionContext::644] Error Code 2: OutOfMemory"
            " (Requested size was 149635638784 bytes.)",
            "[E] [TRT] C:\\source\\rtSafe\\safeRuntime.cpp (25) - Cuda Error in"
            " nvinfer1::internal::DefaultAllocator::allocate: 2 (out of memory)",
        ),
        source=(
            f"{_GH}/pytorch/TensorRT/issues/2836; {_GH}/pytorch/TensorRT/issues/4227;"
            f" {_GH}/NVIDIA/TensorRT/issues/948"
        ),
    ),
    Rule(
        id="tensorrt.kv_cache_too_small",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=r"maxTokensInPagedKvCache must be large enough to process at least 1 sequence",
        runtimes=_TENSORRT,
        description="TensorRT-LLM: the KV cache left in VRAM cannot hold one sequence",
        examples=(
            "[TensorRT-LLM][ERROR] maxTokensInPagedKvCache must be large enough to process at"
            " least 1 sequence to completion (i.e. must be larger than beam_width * tokensPerBlock"
            " * maxBlocksPerSeq)",
        ),
        source=f"{_GH}/NVIDIA/TensorRT-LLM/issues/542",
    ),
    Rule(
        id="tensorrt.executor_insufficient_memory",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=r"Executor creation failed due to insufficient GPU memory",
        runtimes=_TENSORRT,
        description="TensorRT-LLM (PyTorch backend): a component such as the KV cache did not fit",
        examples=(
            "[07/08/2025-19:47:15] [TRT-LLM] [RANK 1] [E] Failed to initialize executor on rank 1:"
            " Executor creation failed due to insufficient GPU memory.",
        ),
        source=f"{_GH}/NVIDIA/TensorRT-LLM/issues/5872",
    ),
    Rule(
        id="triton.onnxruntime_arena",
        incident_class=IncidentClass.VRAM_OOM,
        pattern=r"BFCArena::AllocateRawInternal.*Failed to allocate memory for requested buffer",
        runtimes=_TRITON,
        description="Triton's ONNX Runtime backend: its (GPU) arena could not grow",
        examples=(
            "/onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:368 void*"
            " onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*,"
            " bool, onnxruntime::WaitNotificationFn) Failed to allocate memory for requested"
            " buffer of size 15728896",
        ),
        source=f"{_GH}/triton-inference-server/onnxruntime_backend/issues/249",
    ),
)

START_FAILURE_RULES: tuple[Rule, ...] = (
    Rule(
        id="vllm.shm_insufficient",
        incident_class=IncidentClass.START_FAILURE,
        pattern=r"Insufficient space in /dev/shm",
        runtimes=_VLLM,
        description=(
            "vLLM: the container's /dev/shm is too small (Docker gives 64 MiB): give it "
            "`shm_size` (generated vLLM services have 8gb) or `ipc: host`"
        ),
        examples=(
            "RuntimeError: Insufficient space in /dev/shm for shared-memory allocation: 160 MiB"
            " required, 64 MiB free. Increase /dev/shm (e.g. --shm-size or --ipc=host)",
        ),
        source="vLLM 0.32.0 (CPU) in a container without --shm-size, measured here (issue 12)",
    ),
    Rule(
        id="vllm.max_model_len_over_model",
        incident_class=IncidentClass.START_FAILURE,
        pattern=r"User-specified max_model_len \(\d+\) is greater than the derived max_model_len",
        runtimes=_VLLM,
        description=(
            "vLLM: the rung's context (--max-model-len) is longer than the model was trained for"
        ),
        examples=(
            "  Value error, User-specified max_model_len (4096) is greater than the derived"
            " max_model_len (max_position_embeddings=2048.0 or model_max_length=None in model's"
            " config.json). To allow overriding this maximum, set the env var"
            " VLLM_ALLOW_LONG_MAX_MODEL_LEN=1.",
        ),
        source="vLLM 0.32.0 (CPU): tests/data/vllm/max-model-len-over-derived.log",
    ),
    Rule(
        id="llamacpp.bad_argument",
        incident_class=IncidentClass.START_FAILURE,
        pattern=r"^error: invalid argument: \S",
        runtimes=_LLAMACPP,
        description="llama-server refused an argument it does not know (a flag of another version)",
        examples=("error: invalid argument: --no-mmap",),
        source="llama-server 0.7.0 (Debian), which dropped --no-mmap: measured here (issue 12)",
    ),
    Rule(
        id="argparse.unrecognized_arguments",
        incident_class=IncidentClass.START_FAILURE,
        pattern=r": error: (?:unrecognized arguments|argument --?[\w-]+): ",
        runtimes=None,
        description=(
            "a Python server (vLLM, SGLang, TGI's launcher is Rust) refused its arguments: "
            "argparse's wording"
        ),
        examples=(
            "api_server.py: error: unrecognized arguments: --no-such-flag",
            "vllm serve: error: argument --max-model-len: invalid human_readable_int value: 'x'",
        ),
        source="Python's argparse (Lib/argparse.py: error(), 'unrecognized arguments: %s')",
    ),
)

BUILTIN_RULES: tuple[Rule, ...] = (
    GPU_FAULT_RULES + START_FAILURE_RULES + HOST_OOM_RULES + VRAM_OOM_RULES
)


@dataclass(frozen=True)
class HandledLine:
    """A line a runtime prints and then recovers from by itself: not an incident in its services.

    The only way a runtime takes a line out of detection. The same line from any other
    service (an app relaying the runtime's log, another runtime) is still an incident.
    """

    runtime: str
    # A Python regex matched at the start of a line (after Docker's timestamp) that some rule
    # matched: anchored, so a runtime's final error quoting the same words still counts.
    pattern: str
    description: str
    examples: tuple[str, ...]  # real lines, each also matched by a rule
    source: str


HANDLED_LINES: tuple[HandledLine, ...] = (
    HandledLine(
        runtime="ollama",
        pattern=(
            r"\s*(?:ggml_backend_cuda_buffer_type_alloc_buffer: allocating [\d.,]+ MiB on device"
            r" \d+: cudaMalloc failed: out of memory"
            r"|ggml_gallocr_reserve_n: failed to allocate (?:CUDA|ROCm)\d+ buffer of size \d+)\s*$"
        ),
        description=(
            "Ollama >= 0.12 fits a model by trying allocations and backing off to a smaller"
            " layout; a real failure ends in `llama runner process has terminated`"
        ),
        examples=(
            "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9220.57 MiB on device 0:"
            " cudaMalloc failed: out of memory",
            "ggml_gallocr_reserve_n: failed to allocate CUDA0 buffer of size 9668469760",
        ),
        source=f"{_GH}/ollama/ollama/issues/13303",
    ),
)

# Real lines that mention memory, GPUs or failure and must match no rule, for any runtime.
# docs/detector.md says why each one is not an incident.
NOT_INCIDENTS: tuple[str, ...] = (
    # settings and sizes, logged at start
    "python -m vllm.entrypoints.openai.api_server --model data/Qwen1.5-14B-Chat --host 0.0.0.0"
    " --port 30005 --dtype half --gpu-memory-utilization 0.95",
    "Memory profiling results: total_gpu_memory=23.58GiB initial_memory_usage=15.34GiB"
    " peak_torch_memory=17.06GiB memory_usage_post_profile=15.35GiB non_torch_memory=0.35GiB"
    " kv_cache_size=3.81GiB gpu_memory_utilization=0.90",
    "(VllmWorkerProcess pid=507) INFO 04-12 08:21:19 [worker.py:267] Memory profiling takes"
    " 17.59 seconds",
    "(VllmWorkerProcess pid=507) INFO 04-12 08:21:19 [worker.py:267] model weights take"
    " 21.21GiB; non_torch_memory takes 0.20GiB; PyTorch activation peak memory takes 0.37GiB;"
    " the rest of the memory reserved for KV Cache is 1.57GiB.",
    "INFO 01-11 15:51:18 llm_engine.py:275] # GPU blocks: 229, # CPU blocks: 512",
    "INFO 01-28 16:08:46 [gpu_worker.py:358] Available KV cache memory: 18.78 GiB",
    "INFO 01-28 16:08:46 [kv_cache_utils.py:1305] GPU KV cache size: 175,856 tokens",
    "(EngineCore pid=2884597) INFO 04-15 06:30:01 [worker.py:575] Free memory on device"
    " (60.86/61.27 GiB) on startup. Desired GPU memory utilization is (0.9, 55.14 GiB)."
    " Actual usage: 1.14 GiB for weights, 0.22 GiB for peak activation, 0.13 GiB for non-torch"
    " memory, 0.04 GiB for NPU graph memory. Replace gpu_memory_utilization with"
    " `--kv-cache-memory=57403864576` (53.46 GiB) to fit in",
    "load_tensors:        CUDA0 model buffer size = 48928.09 MiB",
    "llm_load_tensors: offloaded 39/41 layers to GPU",
    "llama_kv_cache_init:      CUDA0 KV buffer size =   896.00 MiB",
    "llama_new_context_with_model: KV self size  =  896.00 MiB, K (f16):  448.00 MiB, V (f16): "
    " 448.00 MiB",
    "ggml_cuda_init: found 2 CUDA devices:",
    "KV Cache is allocated. #tokens: 367404, K size: 8.23 GB, V size: 8.23 GB",
    'time=2025-08-20T11:51:52.493+02:00 level=INFO source=types.go:130 msg="inference compute"'
    " id=GPU-c2e245dd-43c2-fb0c-f77c-93e3e5cd10c5 library=cuda variant=v12 compute=8.6"
    ' driver=12.9 name="NVIDIA GeForce RTX 3070" total="7.7 GiB" available="7.0 GiB"',
    'time=2025-01-16T04:29:50.909Z level=INFO source=memory.go:356 msg="offload to cuda"'
    ' layers.requested=-1 layers.model=62 layers.offload=5 layers.split="" memory.available="[23.3'
    ' GiB]" memory.gpu_overhead="0 B" memory.required.full="415.7 GiB"'
    ' memory.required.partial="17.6 GiB" memory.required.kv="9.5 GiB"'
    ' memory.required.allocations="[17.6 GiB]" memory.weights.total="385.0 GiB"'
    ' memory.weights.repeating="384.3 GiB" memory.weights.nonrepeating="725.0 MiB"'
    ' memory.graph.full="654.0 MiB" memory.graph.partial="1019.5 MiB"',
    'time=2025-08-20T11:51:52.493+02:00 level=INFO source=routes.go:1412 msg="entering low vram'
    ' mode" "total vram"="7.7 GiB" threshold="20.0 GiB"',
    'time=2024-07-24T15:40:33.874+08:00 level=INFO source=sched.go:701 msg="new model will fit in'
    ' available VRAM in single GPU, loading" model=/usr/share/ollama/.ollama/models/blobs/'
    "sha256-65a4313f43b6f94a0a8693d70efe823792303a020601ab3d4cad54cf079296c6"
    " gpu=GPU-36c16c0c-392d-ffc5-13ce-2fd6b9af0668 parallel=4 available=24965218304"
    ' required="1.1 GiB"',
    # traffic and throughput
    "INFO 07-28 06:40:59 [loggers.py:118] Engine 000: Avg prompt throughput: 0.0 tokens/s, Avg"
    " generation throughput: 239.2 tokens/s, Running: 8 reqs, Waiting: 0 reqs, GPU KV cache"
    " usage: 91.2%, Prefix cache hit rate: 0.0%",
    "[GIN] 2024/12/31 - 01:58:01 | 200 |  1.386181264s |       127.0.0.1 | POST    "
    ' "/api/generate"',
    'INFO:     10.80.23.18:51408 - "POST /v1/chat/completions HTTP/1.1" 200 OK',
    # pressure the runtime handles itself
    "WARNING 08-20 10:18:39 scheduler.py:1141] Sequence group 147 is preempted by"
    " PreemptionMode.RECOMPUTE mode because there is not enough KV cache space. This can affect"
    " the end-to-end performance. Increase gpu_memory_utilization or tensor_parallel_size to"
    " provide more KV cache memory. total_num_cumulative_preemption=1",
    "[2025-07-02 07:41:59 DP0 TP0] max_total_tokens=131072 is larger than the profiled value"
    " -561981. Use the profiled value instead.",
    "1.06.520.107 W sched_reserve: compute buffer allocation failed, retrying without pipeline"
    " parallelism",
    "ggml_cuda_host_malloc: failed to allocate 1900,00 MiB of pinned memory: invalid argument",
    "W0410 13:51:44.743979 1 memory.cc:212] Failed to allocate CUDA memory with byte size"
    " 102236160 on GPU 0: CNMEM_STATUS_OUT_OF_MEMORY, falling back to pinned system memory",
    "2020-06-25 11:53:10.941227: W tensorflow/core/common_runtime/bfc_allocator.cc:239] Allocator"
    " (GPU_0_bfc) ran out of memory trying to allocate 120.70MiB with freed_by_count=0. The"
    " caller indicates that this is not a failure, but may mean that there could be performance"
    " gains if more memory were available.",
    'time=2024-12-08T18:05:36.508+02:00 level=DEBUG source=memory.go:330 msg="insufficient VRAM'
    ' to load any model layers"',
    "time=2025-03-07T06:24:32.962Z level=WARN source=sched.go:647 msg=\"gpu VRAM usage didn't"
    ' recover within timeout" seconds=5.176344713 model=/root/.ollama/models/blobs/'
    "sha256-8934d96d3f08982e95922b2b7a2c626a1fe873d7c3b06e8e56d7bc0a1fef9246",
    "[2025-03-07 21:49:33 TP13] Decode out of memory happened. #retracted_reqs: 1,"
    " #new_token_ratio: 0.1474 -> 0.1845",
    "[2022-07-13 21:09:13,651] [WARNING] [stage3.py:2391:step] 2 pytorch allocator cache flushes"
    " since last step. this happens when there is high memory pressure and is detrimental to"
    " performance. if this is happening frequently consider adjusting settings to reduce memory"
    " consumption. If you are unable to make the cache flushes go away consider adding"
    " torch.cuda.empty_cache() calls in your training loop to ensure that all ranks flush their"
    " caches at the same time",
    "2025-03-17 17:48:09.854399: W tensorflow/core/common_runtime/bfc_allocator.cc:343] Garbage"
    " collection: deallocate free memory regions (i.e., allocations) so that we can re-allocate a"
    " larger region to avoid OOM due to memory fragmentation. If you see this message frequently,"
    " you are running near the threshold of the available device memory and re-allocation may"
    " incur great performance overhead. You may try smaller batch sizes to observe the"
    " performance impact. Set TF_ENABLE_GPU_GARBAGE_COLLECTION=false if you'd like to disable"
    " this feature.",
    "2019-06-08 03:44:36.087182: E external/org_tensorflow/tensorflow/compiler/xla/service/gpu/"
    "cudnn_conv_algorithm_picker.cc:555] Resource exhausted: Failed to allocate request for"
    " 3.39GiB (3640655872B) on device ordinal 0",
    "ggml_vulkan: Failed to allocate pinned memory.",
    "ggml_vulkan: vk::Device::allocateMemory: ErrorOutOfDeviceMemory",
    "[TensorRT-LLM][WARNING] Attention workspace size is not enough, increase the size from 0 bytes"
    " to 67462144 bytes",
    "2025-06-10T08:11:40.218311Z  WARN text_generation_launcher: Reducing the max batch prefill"
    " from 8192 to 4096 because there is not enough VRAM to support it.",
    "NVRM: Xid (PCI:0018:01:00): 145, RLW_RXPIPE Nonfatal XC0 i0 Link 13 (0x0409a0c2 0x00000008"
    " 0x00000001 0x00000000 0x00100000 0x00000004)",
    # failures that name no cause, or a cause that is not memory
    "tritonclient.utils.InferenceServerException: [StatusCode.INTERNAL] onnx runtime error 2: not"
    " enough space: expected 270080, got 261760",
    'time=2025-03-07T06:24:27.568Z level=ERROR source=server.go:421 msg="llama runner'
    ' terminated" error="exit status 2"',
    "Error: llama runner process has terminated: signal: killed",
    "CUDA kernel errors might be asynchronously reported at some other API call, so the"
    " stacktrace below might be incorrect.",
    "ubuntu:9621:9691 [6] misc/shmutils.cc:71 NCCL WARN Error: failed to extend"
    " /dev/shm/nccl-fjwOOB to 5967876 bytes",
    # a user's prompt echoed by vLLM's request log (real format, our prompt text)
    "INFO 10-01 18:43:27 logger.py:36] Received request cmpl-c52dbd9a95114d1cbfa182e588138c86-0:"
    " prompt: 'Why does my server log say torch.OutOfMemoryError: CUDA out of memory. Tried to"
    " allocate 2.00 GiB?', params: SamplingParams(n=1, best_of=1, presence_penalty=0.0,"
    " frequency_penalty=0.0, repetition_penalty=1.0, temperature=0.0, top_p=1.0, top_k=-1)",
)


@dataclass(frozen=True)
class EventRule:
    """A Docker event that is an incident: the engine reports it, not a log line."""

    id: str
    incident_class: IncidentClass
    action: str  # the Docker event's action
    exit_code: int | None  # the container's exit code it needs (None: any)
    description: str
    source: str


DOCKER_EVENT_RULES: tuple[EventRule, ...] = (
    EventRule(
        id="docker.oom_event",
        incident_class=IncidentClass.HOST_OOM,
        action="oom",
        exit_code=None,
        description="Docker's `oom` event: the container hit its cgroup memory (RAM) limit",
        source="Docker Engine API, /events (container actions)",
    ),
    EventRule(
        id="docker.exit_137",
        incident_class=IncidentClass.HOST_OOM,
        action="die",
        exit_code=137,
        description=(
            "the container died of SIGKILL (exit 137) that fleetd did not cause: the kernel's"
            " OOM killer, most often; a stop fleetd makes itself is not counted"
        ),
        source="Docker Engine API, /events; docker run reference (exit status 137 = 128 + 9)",
    ),
    EventRule(
        id="docker.exit_0",
        incident_class=IncidentClass.CRASH,
        action="die",
        exit_code=0,
        description=(
            "a server's container exited 0 though nobody stopped it (a vLLM whose engine died"
            " exits 0): a server never stops by itself; counted for runtimes with an API only"
        ),
        source="Docker Engine API, /events; vLLM's EngineDeadError exit (issue 12)",
    ),
    EventRule(
        id="docker.exit_unexplained",
        incident_class=IncidentClass.CRASH_LOOP,
        action="die",
        exit_code=None,
        description=(
            "the container exited non-zero (not 137) and no line of its log matched a rule "
            "within 30 s before, nor among the run's last 200: a crash nobody explains; its "
            "last lines are the evidence"
        ),
        source="Docker Engine API, /events (die, Actor.Attributes.exitCode)",
    ),
)


def classify_event(action: str, exit_code: int | None) -> EventRule | None:
    """The event rule a container event matches, or None."""
    for rule in DOCKER_EVENT_RULES:
        if rule.action == action and rule.exit_code in (None, exit_code):
            return rule
    return None
