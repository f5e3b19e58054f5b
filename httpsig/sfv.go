package httpsig

import (
	"encoding/base64"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// This file parses the few RFC 8941 structured-field shapes that signatures
// use: a dictionary whose members are an inner list of strings with
// parameters (Signature-Input) or a byte sequence (Signature).

// splitTopLevel splits s at sep outside quotes, parentheses and colons-delimited
// byte sequences.
func splitTopLevel(s string, sep byte) []string {
	var out []string
	depth, start := 0, 0
	inStr, inBytes := false, false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case inStr:
			if c == '\\' {
				i++
			} else if c == '"' {
				inStr = false
			}
		case inBytes:
			if c == ':' {
				inBytes = false
			}
		case c == '"':
			inStr = true
		case c == ':':
			inBytes = true
		case c == '(':
			depth++
		case c == ')':
			depth--
		case c == sep && depth == 0:
			out = append(out, s[start:i])
			start = i + 1
		}
	}
	return append(out, s[start:])
}

// parseDict splits a dictionary into label → raw member value.
func parseDict(s string) (map[string]string, error) {
	out := map[string]string{}
	for _, m := range splitTopLevel(s, ',') {
		m = strings.TrimSpace(m)
		if m == "" {
			continue
		}
		key, val, ok := strings.Cut(m, "=")
		if !ok || key == "" {
			return nil, fmt.Errorf("malformed member %q", m)
		}
		if _, dup := out[key]; dup {
			return nil, fmt.Errorf("label %q appears twice", key)
		}
		out[key] = val
	}
	return out, nil
}

// parseByteSeq parses ":base64:".
func parseByteSeq(s string) ([]byte, error) {
	s = strings.TrimSpace(s)
	if len(s) < 2 || s[0] != ':' || s[len(s)-1] != ':' {
		return nil, fmt.Errorf("not a byte sequence: %q", s)
	}
	b, err := base64.StdEncoding.DecodeString(s[1 : len(s)-1])
	if err != nil {
		return nil, fmt.Errorf("byte sequence: %w", err)
	}
	return b, nil
}

// parseInnerList parses `("a" "b");p1=v1;p2="v2"`.
func parseInnerList(s string) ([]string, Params, []string, error) {
	var p Params
	s = strings.TrimSpace(s)
	if !strings.HasPrefix(s, "(") {
		return nil, p, nil, errors.New("expected an inner list")
	}
	end := -1
	inStr := false
	for i := 1; i < len(s); i++ {
		if inStr {
			if s[i] == '\\' {
				i++
			} else if s[i] == '"' {
				inStr = false
			}
			continue
		}
		if s[i] == '"' {
			inStr = true
		} else if s[i] == ')' {
			end = i
			break
		}
	}
	if end < 0 {
		return nil, p, nil, errors.New("unterminated inner list")
	}
	var comps []string
	for _, item := range strings.Fields(s[1:end]) {
		c, err := strconv.Unquote(item)
		if err != nil || !strings.HasPrefix(item, `"`) {
			return nil, p, nil, fmt.Errorf("component %s is not a string", item)
		}
		if c != strings.ToLower(c) {
			return nil, p, nil, fmt.Errorf("component %q must be lower case", c)
		}
		comps = append(comps, c)
	}
	var order []string
	rest := s[end+1:]
	for _, param := range splitTopLevel(rest, ';') {
		param = strings.TrimSpace(param)
		if param == "" {
			continue
		}
		name, val, ok := strings.Cut(param, "=")
		if !ok {
			return nil, p, nil, fmt.Errorf("parameter %q has no value", param)
		}
		str := func() (string, error) {
			v, err := strconv.Unquote(val)
			if err != nil || !strings.HasPrefix(val, `"`) {
				return "", fmt.Errorf("parameter %s must be a string", name)
			}
			return v, nil
		}
		num := func() (time.Time, error) {
			n, err := strconv.ParseInt(val, 10, 64)
			if err != nil {
				return time.Time{}, fmt.Errorf("parameter %s must be an integer", name)
			}
			return time.Unix(n, 0), nil
		}
		var err error
		switch name {
		case "created":
			p.Created, err = num()
		case "expires":
			p.Expires, err = num()
		case "keyid":
			p.KeyID, err = str()
		case "alg":
			p.Alg, err = str()
		case "nonce":
			p.Nonce, err = str()
		default:
			return nil, p, nil, fmt.Errorf("unsupported signature parameter %q", name)
		}
		if err != nil {
			return nil, p, nil, err
		}
		order = append(order, name)
	}
	return comps, p, order, nil
}
