// The NAT lab's command line (the lab itself: scripts/lib/natlab.ts).
//   npx node scripts/natlab.ts up --nat port-restricted [--delay 20] [--prefix nlab1-] [--seconds N]
//   npx node scripts/natlab.ts down --prefix nlab1-

import { createLab, labUnavailableReason, NAT_TYPES, removeLeftovers, type NatType } from "./lib/natlab.ts";

async function cli(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  const opt = (name: string): string | undefined => {
    const k = rest.indexOf(`--${name}`);
    return k >= 0 ? rest[k + 1] : undefined;
  };
  if (cmd === "down") {
    const prefix = opt("prefix");
    if (!prefix) {
      console.error("usage: natlab.ts down --prefix PREFIX");
      return 2;
    }
    const removed = removeLeftovers(prefix);
    console.log(removed.length ? `removed ${removed.join(" ")}` : `nothing with prefix ${prefix}`);
    return 0;
  }
  if (cmd === "up") {
    const nat = (opt("nat") ?? "port-restricted") as NatType;
    if (!NAT_TYPES.includes(nat)) {
      console.error(`--nat must be one of ${NAT_TYPES.join(", ")}`);
      return 2;
    }
    const delayMs = Number(opt("delay") ?? 0);
    const seconds = Number(opt("seconds") ?? 0);
    const why = await labUnavailableReason();
    if (why) {
      console.error(`cannot build the lab: ${why}`);
      return 1;
    }
    const lab = await createLab({ nat, delayMs, prefix: opt("prefix") });
    console.log(lab.describe());
    console.log(`  shell: ip netns exec ${lab.netns("lan")} bash    (Ctrl-C here tears the lab down)`);
    await new Promise<void>((resolve) => {
      const stop = (): void => resolve();
      process.once("SIGINT", stop);
      process.once("SIGTERM", stop);
      if (seconds > 0) setTimeout(stop, seconds * 1000);
    });
    await lab.destroy();
    console.log("lab removed");
    return 0;
  }
  console.error(
    "usage:\n  natlab.ts up --nat open|full-cone|addr-restricted|port-restricted|symmetric [--delay MS] [--prefix P] [--seconds N]\n  natlab.ts down --prefix P",
  );
  return 2;
}

cli(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    console.error(err instanceof Error ? err.message : err);
    process.exit(1);
  },
);
