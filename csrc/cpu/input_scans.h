// Whether the CPU conv reads its activations for NaN and infinities before it lets oneDNN apply the ReLU (whose
// max(x, 0) makes a NaN 0; see conv_bias_act.cpp). On by default, per thread. A fused model turns it off for a
// forward whose input it found finite, in eval, where every conv is one of these calls and nothing of the user's runs
// between them (models/_common.py), under bounds on its activations' magnitudes that show them finite
// (fused_resnet/nn/activation_bounds.py: a tensor the bounds do not know is read, and where a conv's sums might
// overflow fp32 the scans go back on). A call that finds non-finite parameters turns the scans back on for the calls
// after it (the weights' check is made once, when packed). The scans cost a read of every activation: on the 2-core CPU, 1.58 -> 2.32 ms for a 1x1 conv
// 256->64 at 4x56x56; for a whole ResNet-50 forward an estimate of 4-7 % from the bytes read, and at batch 4 its ratio
// to torch.compile went from 0.968-1.016 (every activation scanned) to 1.077 (scans off) on 2026-11-28.
#pragma once

namespace fused_resnet::cpu {

bool input_scans_enabled();
// Sets this thread's switch; returns what it was.
bool set_input_scans_enabled(bool enabled);

}  // namespace fused_resnet::cpu
