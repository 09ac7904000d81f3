// Whether the CPU conv reads its activations for NaN and infinities before it lets oneDNN apply the ReLU (whose
// max(x, 0) makes a NaN 0; see conv_bias_act.cpp). On by default, per thread. A fused model turns it off for a
// forward whose input it found finite, in eval, where every conv is one of these calls and nothing of the user's runs
// between them (models/_common.py): its activations are then finite too, unless a weight, bias or BN statistic is
// not, and a call that finds such parameters turns the scans back on for the calls after it (the weights' check is
// made once, when packed). The scans cost a read of every activation: 4-7 % of a ResNet-50 forward (2-core CPU).
#pragma once

namespace fused_resnet::cpu {

bool input_scans_enabled();
// Sets this thread's switch; returns what it was.
bool set_input_scans_enabled(bool enabled);

}  // namespace fused_resnet::cpu
