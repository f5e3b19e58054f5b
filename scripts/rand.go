package scripts

import (
	crand "crypto/rand"
	"encoding/binary"
	"fmt"
	"math/rand"

	"github.com/d5/tengo/v2"
	"github.com/d5/tengo/v2/stdlib"
)

// maxPerm bounds rand.perm(n): n ints are made at once, inside one builtin
// call the allocation cap does not see.
const maxPerm = 1 << 16

// randModule is Tengo's "rand" module with a generator of the run's own.
// Tengo's stdlib calls the process-wide math/rand functions, and since Go
// 1.20 rand.Seed no longer seeds those, so `rand.seed(n)` did nothing and
// every job shared one sequence. Here each run starts from a fresh random
// seed, and rand.seed(n) reseeds only that run's generator, so a seeded
// script repeats its sequence and one job's seed never affects another.
func randModule(rc *Run) map[string]tengo.Object {
	m := randFuncs(rc.runRand)
	m["seed"] = Func("seed", func(args ...tengo.Object) (tengo.Object, error) {
		seed, err := int64Arg(args)
		if err != nil {
			return nil, err
		}
		rc.rng = rand.New(rand.NewSource(seed))
		return tengo.UndefinedValue, nil
	})
	m["rand"] = Func("rand", func(args ...tengo.Object) (tengo.Object, error) {
		seed, err := int64Arg(args)
		if err != nil {
			return nil, err
		}
		r := rand.New(rand.NewSource(seed))
		fs := randFuncs(func() *rand.Rand { return r })
		fs["seed"] = Func("seed", func(args ...tengo.Object) (tengo.Object, error) {
			seed, err := int64Arg(args)
			if err != nil {
				return nil, err
			}
			r.Seed(seed)
			return tengo.UndefinedValue, nil
		})
		return &tengo.ImmutableMap{Value: fs}, nil
	})
	return m
}

// runRand is the run's generator, made (from a random seed) on first use:
// seeding costs more than most scripts' whole run.
func (rc *Run) runRand() *rand.Rand {
	if rc.rng == nil {
		rc.rng = newRunRand()
	}
	return rc.rng
}

// newRunRand returns a generator seeded from crypto/rand.
func newRunRand() *rand.Rand {
	var b [8]byte
	crand.Read(b[:]) // never fails on Linux
	return rand.New(rand.NewSource(int64(binary.LittleEndian.Uint64(b[:]))))
}

// randFuncs are the generator functions of the module and of the
// generators rand.rand(seed) returns, over the generator get returns.
func randFuncs(get func() *rand.Rand) map[string]tengo.Object {
	return map[string]tengo.Object{
		"int":        Func("int", stdlib.FuncARI64(func() int64 { return get().Int63() })),
		"float":      Func("float", stdlib.FuncARF(func() float64 { return get().Float64() })),
		"exp_float":  Func("exp_float", stdlib.FuncARF(func() float64 { return get().ExpFloat64() })),
		"norm_float": Func("norm_float", stdlib.FuncARF(func() float64 { return get().NormFloat64() })),
		"intn": Func("intn", func(args ...tengo.Object) (tengo.Object, error) {
			n, err := int64Arg(args)
			if err != nil {
				return nil, err
			}
			if n <= 0 {
				return nil, fmt.Errorf("rand.intn(%d): n must be positive", n) // math/rand panics
			}
			return &tengo.Int{Value: get().Int63n(n)}, nil
		}),
		"perm": Func("perm", func(args ...tengo.Object) (tengo.Object, error) {
			n, err := int64Arg(args)
			if err != nil {
				return nil, err
			}
			if n < 0 || n > maxPerm {
				return nil, fmt.Errorf("rand.perm(%d): n must be 0 to %d", n, maxPerm)
			}
			p := get().Perm(int(n))
			out := make([]tengo.Object, len(p))
			for i, v := range p {
				out[i] = &tengo.Int{Value: int64(v)}
			}
			return &tengo.Array{Value: out}, nil
		}),
		"read": Func("read", func(args ...tengo.Object) (tengo.Object, error) {
			if len(args) != 1 {
				return nil, tengo.ErrWrongNumArguments
			}
			b, ok := args[0].(*tengo.Bytes)
			if !ok {
				return nil, tengo.ErrInvalidArgumentType{Name: "first", Expected: "bytes", Found: args[0].TypeName()}
			}
			n, _ := get().Read(b.Value)
			return &tengo.Int{Value: int64(n)}, nil
		}),
	}
}

func int64Arg(args []tengo.Object) (int64, error) {
	if len(args) != 1 {
		return 0, tengo.ErrWrongNumArguments
	}
	n, ok := tengo.ToInt64(args[0])
	if !ok {
		return 0, tengo.ErrInvalidArgumentType{Name: "first", Expected: "int(compatible)", Found: args[0].TypeName()}
	}
	return n, nil
}
