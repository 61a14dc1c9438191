// Summaries of repeated measurements.
export interface Summary {
  n: number;
  median: number;
  min: number;
  max: number;
  q1: number;
  q3: number;
}

function quantile(sorted: number[], q: number): number {
  if (sorted.length === 1) return sorted[0];
  const pos = (sorted.length - 1) * q;
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}

export function summarize(values: number[]): Summary | undefined {
  const v = values.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return undefined;
  return { n: v.length, median: quantile(v, 0.5), min: v[0], max: v[v.length - 1], q1: quantile(v, 0.25), q3: quantile(v, 0.75) };
}

export const median = (values: number[]): number | undefined => summarize(values)?.median;

/** The p-quantile (0..1), interpolated; undefined without finite values. */
export function percentile(values: number[], p: number): number | undefined {
  const v = values.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  return v.length ? quantile(v, p) : undefined;
}
