// All differentiable ops.
#pragma once
#include "framework/ops_nn.h"
#include "framework/ops_tensor.h"
