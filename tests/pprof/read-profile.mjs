// Decodes a gzipped pprof profile (perftools.profiles.Profile) with Datadog's
// pprof-format, a decoder independent of the encoder memgate uses, and prints
// it as JSON for the Rust tests: the sample and period types, the mappings, and
// every sample's values with its call stack as function names, leaf first
// (inlined frames included, innermost first, as pprof orders them). A location
// or function id that does not resolve is an error, as in `go tool pprof`.
//
//   node target/pprof-reader/read-profile.mjs heap.pb.gz
//
// scripts/pprof-reader.sh installs it (and the pinned package) there.
import { readFileSync } from 'node:fs';
import { gunzipSync } from 'node:zlib';
import { Profile } from 'pprof-format';

const profile = Profile.decode(gunzipSync(readFileSync(process.argv[2])));
const strings = profile.stringTable.strings;
const str = (i) => {
  const s = strings[Number(i)];
  if (s === undefined) throw new Error(`string index ${i} out of range`);
  return s;
};
const functions = new Map(profile.function.map((f) => [Number(f.id), f]));
const locations = new Map(profile.location.map((l) => [Number(l.id), l]));
const frames = (id) => {
  const location = locations.get(Number(id));
  if (!location) throw new Error(`sample names location ${id}, which the profile lacks`);
  return location.line.map((line) => {
    const f = functions.get(Number(line.functionId));
    if (!f) throw new Error(`location ${id} names function ${line.functionId}, which the profile lacks`);
    return str(f.name);
  });
};
const valueType = (t) => ({ type: str(t.type), unit: str(t.unit) });
process.stdout.write(JSON.stringify({
  sampleTypes: profile.sampleType.map(valueType),
  periodType: profile.periodType ? valueType(profile.periodType) : null,
  timeNanos: Number(profile.timeNanos),
  mappings: profile.mapping.map((m) => str(m.filename)),
  samples: profile.sample.map((s) => ({
    values: s.value.map(Number),
    stack: s.locationId.flatMap(frames),
  })),
}));
