"""Pure-python EAGLE tree building and greedy tree verification, as SGLang's Triton kernels of
the same names do them (kernels/ops/speculative/spec_tree.py), one row at a time.

Node 0 of each row is the root (the last committed token); draft node j >= 1 came from the
draft step's `selected_index[j - 1]`, whose parent is found through `parent_list`.
"""
from __future__ import annotations

QLEN_ONLY_MODES = (1, 2)  # TreeMaskMode.QLEN_ONLY / _BITPACKING: [N, N] per row, no prefix


def _parent_node(parent_list, selected, b, node_sel, topk, num_nodes):
    """Node index (0 = root) of the parent of the draft token selected as `node_sel`, or None."""
    parent_tb = int(selected[b, node_sel]) // topk
    if parent_tb == 0:
        return 0
    parent_token = int(parent_list[b, parent_tb])
    for pp in range(num_nodes - 1):
        if int(selected[b, pp]) == parent_token:
            return pp + 1
    return None


def build_tree_kernel_efficient_cpu(parent_list, selected_index, verified_seq_len, tree_mask,
                                    positions, retrieve_index, retrieve_next_token,
                                    retrieve_next_sibling, topk, depth, draft_token_num,
                                    tree_mask_mode):
    n = draft_token_num
    mask = tree_mask.view(-1)
    row_base = 0  # FULL_MASK: rows of length seq_len + n, packed per request
    for b in range(verified_seq_len.shape[0]):
        seq_len = int(verified_seq_len[b])
        positions[b * n] = seq_len
        for i in range(n - 1, 0, -1):
            retrieve_index[b, i] = b * n + i
            parent = _parent_node(parent_list, selected_index, b, i - 1, topk, n)
            if parent is None:
                continue
            first_child = int(retrieve_next_token[b, parent])
            retrieve_next_token[b, parent] = i
            if first_child != -1:  # children are linked in increasing node order
                retrieve_next_sibling[b, i] = first_child
        retrieve_index[b, 0] = b * n

        width = n if tree_mask_mode in QLEN_ONLY_MODES else seq_len + n
        prefix = 0 if tree_mask_mode in QLEN_ONLY_MODES else seq_len
        for x in range(n):
            start = (b * n * n if tree_mask_mode in QLEN_ONLY_MODES else row_base) + x * width
            mask[start + prefix] = True  # the root
            mask[start + prefix + 1:start + prefix + n] = False
            if x == 0:
                continue
            cur, depth_x = x - 1, 0
            for _ in range(depth):
                depth_x += 1
                mask[start + prefix + 1 + cur] = True
                parent = _parent_node(parent_list, selected_index, b, cur, topk, n)
                if parent is None or parent == 0:
                    break
                cur = parent - 1
            positions[b * n + x] = seq_len + depth_x
        row_base += n * (seq_len + n)


def verify_tree_greedy_cpu(predicts, accept_index, accept_token_num, candidates, retrive_index,
                           retrive_next_token, retrive_next_sibling, target_predict):
    """Walk each row's tree from the root, following the child whose token equals the target's
    argmax at the last accepted node; record accepted nodes and the target's token after them."""
    max_accept = accept_index.shape[1]
    target = target_predict.reshape(-1)
    for b in range(candidates.shape[0]):
        last = int(retrive_index[b, 0])
        accept_index[b, 0] = last
        num_accepted, cur = 0, 0
        for _ in range(1, max_accept):
            cur = int(retrive_next_token[b, cur])
            want = int(target[last])
            while cur != -1 and int(candidates[b, cur]) != want:
                cur = int(retrive_next_sibling[b, cur])
            if cur == -1:
                break
            predicts[last] = want
            num_accepted += 1
            last = int(retrive_index[b, cur])
            accept_index[b, num_accepted] = last
        accept_token_num[b] = num_accepted
        predicts[last] = target[last]
