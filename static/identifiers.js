// CNPJ (numeric and alphanumeric), CPF and CEP rules: a port of identifiers.py, kept exactly in step.
(function () {
  "use strict";
  const MAX_INPUT_LENGTH = 64;
  const SEPARATORS = ".-/ ";
  const CNPJ_ONLY_SEPARATOR = "/"; // a CPF (111.444.777-35) or CEP (01310-100) never has one
  const SURROUNDING_WHITESPACE = " \t\r\n";
  const LENGTH = { cnpj: 14, cpf: 11, cep: 8 };
  const CNPJ_FIRST_WEIGHTS = [5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2];
  const CNPJ_SECOND_WEIGHTS = [6, 5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2];

  // A rule broken: `key` names the message in the i18n strings, `params` fill its placeholders.
  class InvalidIdentifier extends Error {
    constructor(key, params) {
      super(key);
      this.key = key;
      this.params = params || {};
    }
  }

  const isDigit = (char) => char >= "0" && char <= "9";
  const isAllowed = (char) => /^[0-9A-Za-z]$/.test(char) || SEPARATORS.includes(char);
  const hasLetters = (compact) => !/^[0-9]*$/.test(compact);

  function mod11Digit(values, weights) {
    let sum = 0;
    for (let index = 0; index < weights.length; index += 1) sum += values[index] * weights[index];
    const remainder = sum % 11;
    return remainder < 2 ? 0 : 11 - remainder;
  }

  // The two check digits of a CNPJ base of 12 characters [0-9A-Z]: each character is its char code - 48.
  function cnpjCheckDigits(base12) {
    if (!/^[0-9A-Z]{12}$/.test(base12)) throw new RangeError("a CNPJ base must be 12 characters of 0-9 or A-Z");
    const values = Array.from(base12, (char) => char.charCodeAt(0) - 48);
    const first = mod11Digit(values, CNPJ_FIRST_WEIGHTS);
    const second = mod11Digit([...values, first], CNPJ_SECOND_WEIGHTS);
    return `${first}${second}`;
  }

  function cpfCheckDigits(base9) {
    if (!/^[0-9]{9}$/.test(base9)) throw new RangeError("a CPF base must be 9 digits");
    const values = Array.from(base9, Number);
    const first = mod11Digit(values, [10, 9, 8, 7, 6, 5, 4, 3, 2]);
    const second = mod11Digit([...values, first], [11, 10, 9, 8, 7, 6, 5, 4, 3, 2]);
    return `${first}${second}`;
  }

  function describeCharacter(char) {
    const codePoint = "U+" + char.codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
    // Control, format and space characters are shown by code point only, as the server does.
    if (/^[\p{C}\p{Z}]$/u.test(char)) return codePoint;
    return `'${char}' (${codePoint})`;
  }

  function strip(raw) {
    let start = 0;
    let end = raw.length;
    while (start < end && SURROUNDING_WHITESPACE.includes(raw[start])) start += 1;
    while (end > start && SURROUNDING_WHITESPACE.includes(raw[end - 1])) end -= 1;
    return { stripped: raw.slice(start, end), leading: start };
  }

  // The input without separators, uppercased; throws on a length, empty or character problem.
  function compact(raw) {
    const length = Array.from(raw).length;
    if (length > MAX_INPUT_LENGTH) throw new InvalidIdentifier("too_long", { count: length, max: MAX_INPUT_LENGTH });
    const { stripped, leading } = strip(raw);
    if (!stripped) throw new InvalidIdentifier("empty");
    let position = leading;
    for (const char of stripped) {
      position += 1;
      if (!isAllowed(char)) {
        throw new InvalidIdentifier("bad_character", { character: describeCharacter(char), position });
      }
    }
    const result = Array.from(stripped).filter((char) => !SEPARATORS.includes(char)).join("").toUpperCase();
    if (!result) throw new InvalidIdentifier("no_letters_or_digits");
    return result;
  }

  function detectComplete(value, raw) {
    // A "/" belongs to a CNPJ's mask alone (12.345.678/0001-95): whatever its length, it is one.
    if (value.length === LENGTH.cnpj || raw.includes(CNPJ_ONLY_SEPARATOR)) return "cnpj";
    if (!hasLetters(value)) {
      if (value.length === LENGTH.cpf) return "cpf";
      if (value.length === LENGTH.cep) return "cep";
    }
    throw new InvalidIdentifier("undetectable");
  }

  // Best guess of the type of possibly incomplete input (for the UI); null when unknown.
  function detectType(raw) {
    let value;
    try {
      value = compact(raw);
    } catch (error) {
      if (error instanceof InvalidIdentifier) return null;
      throw error;
    }
    if (hasLetters(value) || raw.includes(CNPJ_ONLY_SEPARATOR) || value.length > LENGTH.cpf) {
      return value.length <= LENGTH.cnpj ? "cnpj" : null;
    }
    if (value.length === LENGTH.cpf) return "cpf";
    if (value.length === LENGTH.cep) return "cep";
    return null;
  }

  const validators = {
    cnpj(value) {
      if (value.length !== LENGTH.cnpj) throw new InvalidIdentifier("cnpj_length", { count: value.length });
      if (!isDigit(value[12]) || !isDigit(value[13])) throw new InvalidIdentifier("cnpj_check_not_digits");
      if (new Set(value).size === 1) throw new InvalidIdentifier("cnpj_all_equal");
      if (cnpjCheckDigits(value.slice(0, 12)) !== value.slice(12)) throw new InvalidIdentifier("cnpj_check_digits");
    },
    cpf(value) {
      if (hasLetters(value)) throw new InvalidIdentifier("cpf_letters");
      if (value.length !== LENGTH.cpf) throw new InvalidIdentifier("cpf_length", { count: value.length });
      if (new Set(value).size === 1) throw new InvalidIdentifier("cpf_all_equal");
      if (cpfCheckDigits(value.slice(0, 9)) !== value.slice(9)) throw new InvalidIdentifier("cpf_check_digits");
    },
    cep(value) {
      if (hasLetters(value)) throw new InvalidIdentifier("cep_letters");
      if (value.length !== LENGTH.cep) throw new InvalidIdentifier("cep_length", { count: value.length });
      if (value === "00000000") throw new InvalidIdentifier("cep_zero");
    },
  };

  // Validate and normalize: {type, value} or throws InvalidIdentifier (parse() of identifiers.py).
  function parse(raw, type) {
    const value = compact(raw);
    const resolved = type || detectComplete(value, raw);
    if (resolved !== "cnpj" && raw.includes(CNPJ_ONLY_SEPARATOR)) throw new InvalidIdentifier(resolved + "_slash");
    validators[resolved](value);
    return { type: resolved, value };
  }

  // The usual printed form: 12.ABC.345/01DE-35, 111.444.777-35, 01310-100.
  function masked(type, value) {
    const v = String(value || "");
    if (type === "cnpj" && v.length === 14) return `${v.slice(0, 2)}.${v.slice(2, 5)}.${v.slice(5, 8)}/${v.slice(8, 12)}-${v.slice(12)}`;
    if (type === "cpf" && v.length === 11) return `${v.slice(0, 3)}.${v.slice(3, 6)}.${v.slice(6, 9)}-${v.slice(9)}`;
    if (type === "cep" && v.length === 8) return `${v.slice(0, 5)}-${v.slice(5)}`;
    return v;
  }

  window.Identifiers = {
    InvalidIdentifier, LENGTH, MAX_INPUT_LENGTH, cnpjCheckDigits, cpfCheckDigits, compact, detectType, parse, masked,
  };
})();
