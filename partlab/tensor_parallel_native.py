"""Tensor parallelism with PyTorch's own API (torch.distributed.tensor.parallel).

A plan names each layer's style and DTensor does the rest:
  ColwiseParallel  weight Shard(0), bias Shard(0): each rank computes hidden/t output features
  RowwiseParallel  weight Shard(1), bias Replicate: each rank computes a partial sum, and the
                   output is made Replicate by one all_reduce
The backward all_reduce of the column layer's input gradient happens only when that input
needs a gradient (every pair but the first). The training step is the reference's own: only
the model is sharded. Compare tensor_parallel_manual.py, which writes the same communication
by hand.

Run: torchrun --standalone --nproc_per_node 2 -m partlab.tensor_parallel_native
"""
import functools

from partlab import distributed, missing_torch_feature, report
from partlab import model as models
from partlab.checkpoint import TrainState
from partlab.config import make_parser
from partlab.harness import Strategy
from partlab.partition import check_tensor_parallel, default_layers, dtensor_plan, dtensor_shards
from partlab.theory.memory import tp_activation_bytes

try:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel, parallelize_module
except ImportError as e:
    raise SystemExit(missing_torch_feature("torch.distributed.tensor.parallel", e)) from None


def validate(settings, launch):
    settings = settings.with_default_layers(default_layers(settings))
    check_tensor_parallel(settings, launch.world_size, native=True)
    return settings


def build(settings, group):
    mesh = init_device_mesh(group.device.type, (group.world_size,))
    model = models.build_model(settings, group.device)
    model = parallelize_module(model, mesh, dtensor_plan(model, settings.sequence_parallel))
    opt = models.make_optimizer(model.parameters(), settings)
    step = models.reference_step_fn(
        model, settings, opt, loss_context=loss_parallel if settings.model == "gpt" else None)
    dtensors = dict(model.named_parameters())
    params, reference_slice = dtensor_shards(dtensors, mesh)
    return Strategy("tensor_parallel_native", step, params, reference_slice,
                    activation_bytes=tp_activation_bytes(settings, group.world_size, params),
                    train_state=TrainState(opt, dtensors))


def parser():
    return make_parser("partlab.tensor_parallel_native",
                       "Tensor parallelism with torch.distributed.tensor.parallel (DTensor).")


def main(argv=None):
    return distributed.run(parser(), validate,
                           functools.partial(report.train_and_report, build), argv)


if __name__ == "__main__":
    distributed.exit_process(main())
