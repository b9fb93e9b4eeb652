import { injectorFor } from '../injectors/index.ts';
import { PRESET_NAMES, PRESETS } from './presets.ts';
import { NAME } from './route-schema.ts';

/** A route file's data with its preset's keys filled in, before strict validation. */
export interface Expanded {
  readonly data: unknown;
  readonly preset: string | undefined;
  /** Top-level keys that came from the preset (the file did not write them). */
  readonly fromPreset: ReadonlySet<string>;
}

export interface PresetProblem {
  readonly path: readonly string[];
  readonly message: string;
}

const NONE: ReadonlySet<string> = new Set();

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/**
 * Expand `preset: NAME`: the preset's keys, then the file's own keys over them (a key the file
 * writes replaces the preset's value whole), and `prefix: /<name>` unless the file sets one. An
 * unknown preset, or a preset whose scheme this build does not have, is a problem at `preset`.
 */
export function applyPreset(data: unknown): Expanded | { problem: PresetProblem } {
  if (!isRecord(data) || !Object.hasOwn(data, 'preset')) return { data, preset: undefined, fromPreset: NONE };
  const name = data.preset;
  const preset = typeof name === 'string' ? PRESETS.get(name) : undefined;
  if (typeof name !== 'string' || !preset) {
    return { problem: { path: ['preset'], message: `preset: unknown preset ${JSON.stringify(name)}; known presets: ${PRESET_NAMES.join(', ')}` } };
  }
  const inherited = Object.entries(preset.route).filter(([key]) => !Object.hasOwn(data, key));
  if (!Object.hasOwn(data, 'prefix') && typeof data.name === 'string' && NAME.test(data.name)) inherited.push(['prefix', `/${data.name}`]);
  const fromPreset = new Set(inherited.map(([key]) => key));

  if (fromPreset.has('inject')) {
    const injections = Array.isArray(preset.route.inject) ? preset.route.inject : [preset.route.inject];
    for (const injection of injections) {
      const scheme = String(injection.scheme);
      if (!injectorFor(scheme)) {
        return { problem: { path: ['preset'], message: `preset "${name}" needs inject scheme "${scheme}", which this proxy does not have yet (write an inject: of your own to use the rest of the preset)` } };
      }
    }
  }
  // fromEntries defines own properties, so a "__proto__" key in the file stays a key (and is refused).
  return { data: Object.fromEntries([...inherited, ...Object.entries(data)]), preset: name, fromPreset };
}
