package gradcache_test

import (
	"encoding/binary"
	"fmt"
	"math"
	"os"
	"path/filepath"

	"github.com/peft-loraone/peft-loraone/gradcache"
)

func Example() {
	dir, _ := os.MkdirTemp("", "gradcache")
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "grads.safetensors.zst")

	g := []float32{1, 2, 3, 4, 5, 6} // a 2×3 gradient, row-major
	data := make([]byte, 4*len(g))
	for i, x := range g {
		binary.LittleEndian.PutUint32(data[4*i:], math.Float32bits(x))
	}
	err := gradcache.Write(path, []gradcache.Tensor{{Name: "layer.0", DType: gradcache.F32, Shape: []int{2, 3}, Data: data}},
		map[string]string{"model": "demo"}, gradcache.WriteOptions{})
	if err != nil {
		fmt.Println(err)
		return
	}

	r, err := gradcache.Open(path)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer r.Close()
	info := r.Tensors()[0]
	fmt.Println(info.Name, info.DType, info.Shape, r.Meta()["model"], r.Meta()["format_version"])
	out := make([]byte, 4*info.Numel())
	if err := r.ReadInto(map[string]gradcache.Dest{"layer.0": {DType: gradcache.F32, Data: out}}); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(math.Float32frombits(binary.LittleEndian.Uint32(out[20:])))
	// Output:
	// layer.0 F32 [2 3] demo 1
	// 6
}
