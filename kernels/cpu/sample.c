/* sample.c: one token from logits, by the eight steps of iq_sample in
 * innerq.h. With top_k the candidates are chosen by a min-heap of size top_k
 * (O(vocab log k)) and only those are sorted; without it the whole vocabulary
 * is radix sorted. The sums run in candidate order, as the CUDA twin's do. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"
#include "../checks.h"

typedef struct {
  float value;
  int32_t id;
} candidate;

/* a comes before b: higher value first, lower id first on ties. */
static int before(candidate a, candidate b) {
  return a.value > b.value || (a.value == b.value && a.id < b.id);
}

static int compare(const void *a, const void *b) {
  candidate x = *(const candidate *)a, y = *(const candidate *)b;
  return before(x, y) ? -1 : before(y, x) ? 1 : 0;
}

/* Min-heap by `before` order: the root is the candidate that comes last. */
static void sift_down(candidate *heap, int size, int i) {
  for (;;) {
    int last = i, l = 2 * i + 1, r = l + 1;
    if (l < size && before(heap[last], heap[l])) last = l;
    if (r < size && before(heap[last], heap[r])) last = r;
    if (last == i) return;
    candidate t = heap[i];
    heap[i] = heap[last];
    heap[last] = t;
    i = last;
  }
}

/* Moves the first k of all[0..vocab) in candidate order to all[0..k), sorted. */
static void top_k_sorted(candidate *all, int vocab, int k) {
  for (int i = k / 2 - 1; i >= 0; i--) sift_down(all, k, i);
  for (int i = k; i < vocab; i++)
    if (before(all[i], all[0])) {
      all[0] = all[i];
      sift_down(all, k, 0);
    }
  qsort(all, (size_t)k, sizeof *all, compare);
}

/* A key whose ascending order is candidate order: value descending, -0 and +0
 * equal (the stable sort keeps ids ascending among equal keys). NaN is
 * rejected before this. */
static uint32_t sort_key(float value) {
  uint32_t bits;
  if (value == 0.0f) value = 0.0f;
  memcpy(&bits, &value, 4);
  return bits & 0x80000000u ? bits : ~bits & 0x7fffffffu;
}

/* Sorts cand[0..vocab) (ids ascending) into candidate order: a stable LSD
 * radix sort by 11-bit digits through tmp; three passes, ending in cand. */
static void sort_all(candidate *cand, candidate *tmp, int vocab) {
  candidate *src = cand, *dst = tmp;
  for (int shift = 0; shift < 33; shift += 11) {
    int64_t start[2048] = {0};
    for (int i = 0; i < vocab; i++) start[sort_key(src[i].value) >> shift & 2047]++;
    int64_t at = 0;
    for (int b = 0; b < 2048; b++) {
      int64_t c = start[b];
      start[b] = at;
      at += c;
    }
    for (int i = 0; i < vocab; i++) dst[start[sort_key(src[i].value) >> shift & 2047]++] = src[i];
    candidate *t = src;
    src = dst;
    dst = t;
  }
  if (src != cand) memcpy(cand, src, (size_t)vocab * sizeof *cand);
}

/* Logits iq_sample cannot sample (innerq.h): writes the token -(4 * id + reason)
 * the CUDA twin writes and fails with the message the caller derives from it. */
enum { NAN_LOGIT = 1, POS_INF_MAX = 2, NEG_INF_MAX = 3 };
static int unsampleable(iq_ctx *ctx, int32_t *out_token, int reason, int32_t id) {
  *out_token = -(4 * id + reason);
  if (reason == NAN_LOGIT) return iq_fail(ctx, IQ_ERR_ARG, "iq_sample: logit %d is NaN", id);
  if (reason == POS_INF_MAX)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_sample: the largest logit (id %d) is +inf", id);
  return iq_fail(ctx, IQ_ERR_ARG, "iq_sample: every logit is -inf");
}

/* m, the largest value, at id: fails unless it is finite (-inf only when every value is). */
static int check_largest(iq_ctx *ctx, int32_t *out_token, float m, int32_t id) {
  if (isfinite(m)) return IQ_OK;
  return m > 0.0f ? unsampleable(ctx, out_token, POS_INF_MAX, id)
                  : unsampleable(ctx, out_token, NEG_INF_MAX, 0);
}

int iq_sample(iq_ctx *ctx, int32_t *out_token, const float *logits, int vocab,
              const int32_t *history, int n_history, float repeat_penalty, float temperature,
              int top_k, float top_p, float min_p, float uniform) {
  int s = iq_check_sample(ctx, out_token, logits, vocab, history, n_history, repeat_penalty,
                          temperature, top_k, top_p, min_p, uniform);
  if (s != IQ_OK) return s;
  /* candidates, the radix sort's second buffer, p, the history's seen flags */
  size_t cand_bytes = (size_t)vocab * sizeof(candidate);
  void *scratch;
  s = iq_scratch(ctx, 2 * cand_bytes + (size_t)vocab * (sizeof(float) + 1), &scratch);
  if (s != IQ_OK) return s;
  candidate *cand = scratch, *tmp = cand + vocab;
  float *p = (float *)(tmp + vocab);
  uint8_t *seen = (uint8_t *)(p + vocab);

  /* 1. the repetition penalty, on a copy, each distinct id once */
  for (int i = 0; i < vocab; i++) {
    if (isnan(logits[i])) return unsampleable(ctx, out_token, NAN_LOGIT, i);
    cand[i] = (candidate){logits[i], i};
  }
  if (repeat_penalty != 1.0f && n_history > 0) {
    memset(seen, 0, (size_t)vocab);
    for (int i = 0; i < n_history; i++) {
      int32_t id = history[i];
      if (id < 0 || id >= vocab || seen[id]) continue;
      seen[id] = 1;
      float l = cand[id].value;
      cand[id].value = l > 0.0f ? l / repeat_penalty : l * repeat_penalty;
    }
  }
  /* 2. greedy */
  if (temperature <= 0.0f) {
    int best = 0;
    for (int i = 1; i < vocab; i++)
      if (cand[i].value > cand[best].value) best = i;
    s = check_largest(ctx, out_token, cand[best].value, best);
    if (s != IQ_OK) return s;
    *out_token = best;
    return IQ_OK;
  }
  /* 3-4. temperature, candidate order, top_k */
  for (int i = 0; i < vocab; i++) cand[i].value /= temperature;
  int count = top_k > 0 && top_k < vocab ? top_k : vocab;
  if (count < vocab) top_k_sorted(cand, vocab, count);
  else sort_all(cand, tmp, vocab);
  /* 5. softmax over the candidates; it needs a finite largest value (all
   * -inf, an +inf logit or overflow by a tiny temperature have none) */
  s = check_largest(ctx, out_token, cand[0].value, cand[0].id);
  if (s != IQ_OK) return s;
  float sum = 0.0f;
  for (int i = 0; i < count; i++) sum += p[i] = expf(cand[i].value - cand[0].value);
  for (int i = 0; i < count; i++) p[i] /= sum;
  /* 6. min_p: p is non-increasing, so the kept set is a prefix */
  int kept = count;
  if (min_p > 0.0f) {
    float floor = min_p * p[0];
    kept = 0;
    while (kept < count && p[kept] >= floor) kept++;
  }
  /* 7. top_p: the shortest prefix reaching it */
  if (top_p < 1.0f) {
    float cum = 0.0f;
    for (int i = 0; i < kept; i++)
      if ((cum += p[i]) >= top_p) {
        kept = i + 1;
        break;
      }
  }
  /* 8. the pick; rounding can leave the running sum short of the target to the end */
  float total = 0.0f;
  for (int i = 0; i < kept; i++) total += p[i];
  float target = uniform * total, cum = 0.0f;
  int pick = kept - 1;
  for (int i = 0; i < kept; i++)
    if ((cum += p[i]) > target) {
      pick = i;
      break;
    }
  *out_token = cand[pick].id;
  return IQ_OK;
}
