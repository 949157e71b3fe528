// P-LoRA frontend: the one helper both extensions use to add behaviour to a frontend callback.
// Chains instead of overwriting, so other extensions' handlers on the same node or widget still run.
// Loaded by ComfyUI like every file in web/js; it registers nothing itself.

/** Run `extra` after `object[method]` (which may be missing), with the same `this` and arguments. */
export function chain(object, method, extra) {
  const original = object[method];
  object[method] = function (...args) {
    const result = original?.apply(this, args);
    extra.apply(this, args);
    return result;
  };
}
