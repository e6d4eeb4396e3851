// A query row of a cached_attention task (../cached_attention_op.h): its GROUP heads that share the task's KV head,
// where their output goes, and how many of its sequence's cached keys it attends to.
#pragma once
#include <torch/extension.h>

struct Row {
    const at::BFloat16* q;
    at::BFloat16* out;
    int64_t len;
};
