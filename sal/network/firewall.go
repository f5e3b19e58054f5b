package network

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"
)

// TableName is writ's nftables table (family inet). writ owns it whole and
// never touches any other table.
const TableName = "writ"

var writTable = &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet}

// chainSpec is a base chain of writ's table with its rules, either as
// writ wants it or as the kernel reports it.
type chainSpec struct {
	name     string
	typ      nftables.ChainType
	hook     nftables.ChainHook
	priority nftables.ChainPriority
	policy   nftables.ChainPolicy
	rules    []ruleSpec
}

type ruleSpec struct {
	comment string
	exprs   []expr.Any
}

// wantRuleset is the whole table for the given networks:
//
//   - forward: replies pass; port-forwarded (DNATed) connections pass;
//     anything routed into a writ bridge from another interface is
//     dropped, which isolates networks from each other and from outside.
//     Traffic within one network is bridged and never reaches this hook.
//   - postrouting: a network's traffic leaving it is masqueraded, and so
//     is hairpin traffic (a guest reaching a sibling through a forward).
//   - prerouting and output: port forwards, for packets addressed to one
//     of the host's own addresses (from outside and from the host).
func wantRuleset(nets []Network) []chainSpec {
	forward := chainSpec{name: "forward", typ: nftables.ChainTypeFilter, hook: *nftables.ChainHookForward, priority: *nftables.ChainPriorityFilter, policy: nftables.ChainPolicyAccept}
	post := chainSpec{name: "postrouting", typ: nftables.ChainTypeNAT, hook: *nftables.ChainHookPostrouting, priority: *nftables.ChainPriorityNATSource, policy: nftables.ChainPolicyAccept}
	pre := chainSpec{name: "prerouting", typ: nftables.ChainTypeNAT, hook: *nftables.ChainHookPrerouting, priority: *nftables.ChainPriorityNATDest, policy: nftables.ChainPolicyAccept}
	out := chainSpec{name: "output", typ: nftables.ChainTypeNAT, hook: *nftables.ChainHookOutput, priority: *nftables.ChainPriorityNATDest, policy: nftables.ChainPolicyAccept}

	forward.rules = append(forward.rules,
		ruleSpec{"writ: replies", cat(ctBits(expr.CtKeySTATE, expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED), accept())},
		ruleSpec{"writ: port forwards", cat(ctBits(expr.CtKeySTATUS, ipsDstNAT), accept())},
	)
	for _, n := range nets {
		forward.rules = append(forward.rules, ruleSpec{"net/" + n.Name + ": isolation",
			cat(ifname(expr.MetaKeyOIFNAME, expr.CmpOpEq, n.Bridge), ifname(expr.MetaKeyIIFNAME, expr.CmpOpNeq, n.Bridge), drop())})
		post.rules = append(post.rules,
			ruleSpec{"net/" + n.Name + ": masquerade", cat(inPrefix(12, n.Subnet, expr.CmpOpEq), inPrefix(16, n.Subnet, expr.CmpOpNeq), masq())},
			ruleSpec{"net/" + n.Name + ": hairpin", cat(inPrefix(12, n.Subnet, expr.CmpOpEq), inPrefix(16, n.Subnet, expr.CmpOpEq), ctBits(expr.CtKeySTATUS, ipsDstNAT), masq())},
		)
		if n.Prefix6.IsValid() {
			post.rules = append(post.rules, ruleSpec{"net/" + n.Name + ": masquerade6", cat(inPrefix(8, n.Prefix6, expr.CmpOpEq), inPrefix(24, n.Prefix6, expr.CmpOpNeq), masq())})
		}
		for _, f := range n.Forwards {
			r := ruleSpec{"net/" + n.Name + ": forward " + f.String(), cat(localDst(), l4port(f.Proto, f.HostPort), dnat(f.Addr, f.Port))}
			pre.rules = append(pre.rules, r)
			out.rules = append(out.rules, r)
		}
	}
	return []chainSpec{forward, out, post, pre}
}

// ipsDstNAT is IPS_DST_NAT of the conntrack status ("ct status dnat").
const ipsDstNAT = 0x20

func cat(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func native32(v uint32) []byte {
	b := make([]byte, 4)
	binary.NativeEndian.PutUint32(b, v)
	return b
}

func ctBits(key expr.CtKey, bits uint32) []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: key},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: native32(bits), Xor: native32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: native32(0)},
	}
}

func ifname(key expr.MetaKey, op expr.CmpOp, name string) []expr.Any {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return []expr.Any{&expr.Meta{Key: key, Register: 1}, &expr.Cmp{Op: op, Register: 1, Data: b}}
}

// inPrefix matches the address at offset of the network header (IPv4
// saddr 12, daddr 16; IPv6 saddr 8, daddr 24) against p.
func inPrefix(offset uint32, p netip.Prefix, op expr.CmpOp) []expr.Any {
	proto, size := byte(unix.NFPROTO_IPV4), 4
	if p.Addr().Is6() {
		proto, size = unix.NFPROTO_IPV6, 16
	}
	mask := make([]byte, size)
	for i := 0; i < p.Bits(); i++ {
		mask[i/8] |= 0x80 >> (i % 8)
	}
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: uint32(size)},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: uint32(size), Mask: mask, Xor: make([]byte, size)},
		&expr.Cmp{Op: op, Register: 1, Data: p.Masked().Addr().AsSlice()},
	}
}

// localDst matches packets addressed to one of the host's own addresses
// ("fib daddr type local").
func localDst() []expr.Any {
	return []expr.Any{
		&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: native32(unix.RTN_LOCAL)},
	}
}

func l4port(proto string, port uint16) []expr.Any {
	p := byte(unix.IPPROTO_TCP)
	if proto == "udp" {
		p = unix.IPPROTO_UDP
	}
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV4}},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{p}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.BigEndian.AppendUint16(nil, port)},
	}
}

func dnat(addr netip.Addr, port uint16) []expr.Any {
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: addr.AsSlice()},
		&expr.Immediate{Register: 2, Data: binary.BigEndian.AppendUint16(nil, port)},
		// The kernel reports max registers equal to min ones when only min
		// ones are given; naming them keeps the desired and reported forms
		// identical, so an unchanged ruleset is recognised as such.
		&expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1, RegAddrMax: 1, RegProtoMin: 2, RegProtoMax: 2, Specified: true},
	}
}

func masq() []expr.Any   { return []expr.Any{&expr.Masq{}} }
func accept() []expr.Any { return []expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}} }
func drop() []expr.Any   { return []expr.Any{&expr.Verdict{Kind: expr.VerdictDrop}} }

// applyFirewall makes writ's table match the networks, in the current
// network namespace; with no networks there is no table. When the kernel already holds exactly that table it
// sends nothing (rule handles stay as they are). Otherwise it deletes and
// re-creates the table in one netlink batch, which the kernel applies
// atomically: no packet ever sees a half-built ruleset.
func applyFirewall(nets []Network) error {
	want := wantRuleset(nets)
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("network: nftables: %w", err)
	}
	have, exists, err := readTable(c)
	if err != nil {
		if len(nets) == 0 && (errors.Is(err, unix.EPROTONOSUPPORT) || strings.Contains(err.Error(), "protocol not supported")) {
			// No nf_tables in the kernel (yet: a booting node loads it while
			// it registers), so there is no table to remove either.
			return nil
		}
		return err
	}
	if exists && render(have) == render(want) || !exists && len(nets) == 0 {
		return nil // nothing to change; a host without networks gets no table
	}
	if exists {
		c.DelTable(writTable)
	}
	if len(nets) == 0 {
		// The last network went: take the table with it, leaving the host
		// as writ found it (no empty table behind).
		if err := c.Flush(); err != nil {
			return fmt.Errorf("network: delete nftables table %s: %w", TableName, err)
		}
		return nil
	}
	c.AddTable(writTable)
	for _, cs := range want {
		hook, prio, policy := cs.hook, cs.priority, cs.policy
		ch := c.AddChain(&nftables.Chain{Name: cs.name, Table: writTable, Type: cs.typ, Hooknum: &hook, Priority: &prio, Policy: &policy})
		for _, r := range cs.rules {
			c.AddRule(&nftables.Rule{Table: writTable, Chain: ch, Exprs: r.exprs, UserData: userdata.AppendString(nil, userdata.TypeComment, r.comment)})
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("network: apply nftables table %s: %w", TableName, err)
	}
	return nil
}

// readTable reads writ's table back from the kernel.
func readTable(c *nftables.Conn) ([]chainSpec, bool, error) {
	if _, err := c.ListTableOfFamily(TableName, nftables.TableFamilyINet); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil, false, nil
		}
		return nil, false, fmt.Errorf("network: read nftables table %s: %w", TableName, err)
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, true, fmt.Errorf("network: list nftables chains: %w", err)
	}
	var out []chainSpec
	for _, ch := range chains {
		if ch.Table.Name != TableName {
			continue
		}
		cs := chainSpec{name: ch.Name, typ: ch.Type}
		if ch.Hooknum != nil {
			cs.hook = *ch.Hooknum
		}
		if ch.Priority != nil {
			cs.priority = *ch.Priority
		}
		if ch.Policy != nil {
			cs.policy = *ch.Policy
		}
		rules, err := c.GetRules(writTable, ch)
		if err != nil {
			return nil, true, fmt.Errorf("network: list rules of %s: %w", ch.Name, err)
		}
		for _, r := range rules {
			comment, _ := userdata.GetString(r.UserData, userdata.TypeComment)
			cs.rules = append(cs.rules, ruleSpec{comment: comment, exprs: r.Exprs})
		}
		out = append(out, cs)
	}
	return out, true, nil
}

// readRuleset renders writ's table as the kernel holds it ("" if none).
func readRuleset() (string, error) {
	c, err := nftables.New()
	if err != nil {
		return "", fmt.Errorf("network: nftables: %w", err)
	}
	chains, exists, err := readTable(c)
	if err != nil || !exists {
		return "", err
	}
	return render(chains), nil
}

// render prints a table in a stable text form, close to `nft --debug=netlink`:
// one line per expression, so golden files show exactly what the kernel
// holds. Chains are sorted by name; rules keep their order.
func render(chains []chainSpec) string {
	chains = append([]chainSpec(nil), chains...)
	sort.Slice(chains, func(i, j int) bool { return chains[i].name < chains[j].name })
	var b strings.Builder
	fmt.Fprintf(&b, "table inet %s\n", TableName)
	for _, cs := range chains {
		policy := "accept"
		if cs.policy == nftables.ChainPolicyDrop {
			policy = "drop"
		}
		hook := map[nftables.ChainHook]string{*nftables.ChainHookPrerouting: "prerouting", *nftables.ChainHookInput: "input", *nftables.ChainHookForward: "forward", *nftables.ChainHookOutput: "output", *nftables.ChainHookPostrouting: "postrouting"}[cs.hook]
		fmt.Fprintf(&b, "chain %s { type %s hook %s priority %d; policy %s }\n", cs.name, cs.typ, hook, cs.priority, policy)
		for _, r := range cs.rules {
			fmt.Fprintf(&b, "  rule # %s\n", r.comment)
			for _, e := range r.exprs {
				fmt.Fprintf(&b, "    %s\n", renderExpr(e))
			}
		}
	}
	return b.String()
}

func renderExpr(e expr.Any) string {
	switch x := e.(type) {
	case *expr.Meta:
		return fmt.Sprintf("meta load %s => reg %d", metaKeys[x.Key], x.Register)
	case *expr.Cmp:
		if name := strings.TrimRight(string(x.Data), "\x00"); len(x.Data) == unix.IFNAMSIZ && name != "" && strings.Trim(name, "abcdefghijklmnopqrstuvwxyz0123456789-_.") == "" {
			return fmt.Sprintf("cmp %s reg %d %q", cmpOps[x.Op], x.Register, name)
		}
		return fmt.Sprintf("cmp %s reg %d 0x%s", cmpOps[x.Op], x.Register, hex.EncodeToString(x.Data))
	case *expr.Payload:
		base := map[expr.PayloadBase]string{expr.PayloadBaseLLHeader: "link", expr.PayloadBaseNetworkHeader: "network", expr.PayloadBaseTransportHeader: "transport"}[x.Base]
		return fmt.Sprintf("payload load %db @ %s header + %d => reg %d", x.Len, base, x.Offset, x.DestRegister)
	case *expr.Bitwise:
		return fmt.Sprintf("bitwise reg %d = (reg %d & 0x%s) ^ 0x%s", x.DestRegister, x.SourceRegister, hex.EncodeToString(x.Mask), hex.EncodeToString(x.Xor))
	case *expr.Ct:
		key := map[expr.CtKey]string{expr.CtKeySTATE: "state", expr.CtKeySTATUS: "status"}[x.Key]
		return fmt.Sprintf("ct load %s => reg %d", key, x.Register)
	case *expr.Fib:
		return fmt.Sprintf("fib daddr=%t type=%t => reg %d", x.FlagDADDR, x.ResultADDRTYPE, x.Register)
	case *expr.Immediate:
		return fmt.Sprintf("immediate reg %d 0x%s", x.Register, hex.EncodeToString(x.Data))
	case *expr.Verdict:
		v := map[expr.VerdictKind]string{expr.VerdictAccept: "accept", expr.VerdictDrop: "drop"}[x.Kind]
		if v == "" {
			v = fmt.Sprint(int64(x.Kind))
		}
		return "verdict " + v
	case *expr.NAT:
		t := "snat"
		if x.Type == expr.NATTypeDestNAT {
			t = "dnat"
		}
		return fmt.Sprintf("nat %s family %d addr reg %d-%d proto reg %d-%d", t, x.Family, x.RegAddrMin, x.RegAddrMax, x.RegProtoMin, x.RegProtoMax)
	case *expr.Masq:
		return "masq"
	}
	return fmt.Sprintf("%T %+v", e, e)
}

var metaKeys = map[expr.MetaKey]string{
	expr.MetaKeyNFPROTO: "nfproto", expr.MetaKeyL4PROTO: "l4proto",
	expr.MetaKeyIIFNAME: "iifname", expr.MetaKeyOIFNAME: "oifname",
}

var cmpOps = map[expr.CmpOp]string{expr.CmpOpEq: "eq", expr.CmpOpNeq: "neq"}
