"""cnnext's benchmark suite, a package: ``python -m benchmarks.run`` from the repository root.

Modules, in the order a run uses them:
- ``shapes``: the conv layers of LeNet-5 (28x28), VGG-11 and ResNet-18 on CIFAR-10 (32x32) and
  ResNet-18 at 224x224 (on CUDA every distinct shape, batch 32 and 128 too), the pools of the
  same networks, and the tiny shapes of the host-cost family;
- ``config``: what to run (``Config``), where (``Plan``: ``cpu``; ``cuda``; ``emu`` = the CUDA
  plan with cnnext's CUDA kernels run by the emulator on CPU tensors, for testing the harness)
  and the list of cases (``Spec``);
- ``cases``: per family (``conv``, ``fused``, ``pool``, ``host``) the cnnext implementations and
  the PyTorch baselines of one case;
- ``validate``: every implementation against the case's reference, before anything is timed;
- ``timing``: ``torch.utils.benchmark.Timer.blocked_autorange``; on CUDA each call is timed by
  CUDA events after an L2 flush (a buffer larger than L2 is zeroed), the Timer driving the loop;
- ``machine``: machine info and peaks (CPU: a measured sgemm / oneDNN 1x1-conv probe and a copy;
  GPU: datasheet peaks by name);
- ``suite``: the run (and the cuDNN-benchmark child process);
- ``report``: the Compare table, JSON, Markdown and PNG; ``cli``: the shared command line.

Entry points: ``run`` (every family), ``conv_direct``, ``conv_im2col``, ``conv_bn_relu``,
``pool`` and ``host`` (one family each), all run as ``python -m benchmarks.<name>``.
"""
