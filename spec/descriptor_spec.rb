# frozen_string_literal: true

require "spec_helper"
require "tmpdir"

# Descriptor sets loaded at run time (Flowctl.load_descriptor_set): the mechanism the
# built-in protocols are loaded with too.
RSpec.describe "descriptor sets" do
  DESCRIPTOR_FIXTURES = File.expand_path("fixtures", __dir__)
  ACME = (FlowctlSpecAcme = Module.new) # where the user's types go (types are the process's: loaded once)

  def protoc_set(*files, dir: DESCRIPTOR_FIXTURES)
    out = File.join(Dir.mktmpdir("flowctl-desc"), "set.pb")
    ok = system("protoc", "-I#{dir}", "-I/usr/include", "--include_imports", "--descriptor_set_out=#{out}",
                *files.map { |f| File.join(dir, f) })
    raise "protoc failed on #{files}" unless ok

    File.binread(out)
  end

  # A FileDescriptorSet made by hand with the bootstrap classes, for input protoc never makes.
  def set_of(*files) = Flowctl::Protobuf::FileDescriptorSet.new(file: files).to_proto

  def file(name, package: "bad.v1", messages: [], deps: [], syntax: "proto3", enums: [])
    Flowctl::Protobuf::FileDescriptorProto.new(name: name, package: package, message_type: messages,
                                                dependency: deps, syntax: syntax, enum_type: enums)
  end

  def message(name, *fields) = Flowctl::Protobuf::DescriptorProto.new(name: name, field: fields)

  def field(name, number, type: :TYPE_STRING, label: :LABEL_OPTIONAL, type_name: nil)
    Flowctl::Protobuf::FieldDescriptorProto.new(name: name, number: number, type: type, label: label,
                                                 type_name: type_name)
  end

  def load(bytes, **kw) = Flowctl.load_descriptor_set(bytes, root: Module.new, **kw)

  describe "the built-in protocols" do
    it "are loaded from lib/flowctl/protocols.pb as classes of flowctl.v1 and the seed's packages" do
      expect(Flowctl::V1::Event.descriptor_name).to eq("flowctl.v1.Event")
      expect(Flowctl::ControlPlane::RegisterProcessorRequest.descriptor_name)
        .to eq("obsrvr.flow.controlplane.RegisterProcessorRequest")
      expect(Flowctl::Protobuf::Empty.new.to_proto).to eq("")
      expect(Flowctl::Grpc::Health::V1::HealthCheckResponse::ServingStatus::SERVING).to eq(1)
    end

    it "declare every service once, with its shapes from the descriptor" do
      shapes = ->(svc) { svc.rpcs.to_h { |r| [r.name, r.shape] } }
      expect(shapes[Flowctl::V1::SourceService]["StreamEvents"]).to eq(:server_streaming)
      expect(shapes[Flowctl::V1::ProcessorService]["Process"]).to eq(:bidi)
      expect(shapes[Flowctl::V1::ConsumerService]["Consume"]).to eq(:client_streaming)
      expect(shapes[Flowctl::V1::ControlPlaneService].values.uniq).to eq([:unary])
      expect(shapes[Flowctl::Grpc::Health::V1::Health]).to eq("Check" => :unary, "Watch" => :server_streaming)
      expect(Flowctl::Processor::Service).to equal(Flowctl::Processor::ProcessorService)
      expect(Flowctl::ControlPlane::Service.full_name).to eq("obsrvr.flow.controlplane.ControlPlane")
      expect(Flowctl::V1.const_defined?(:Service, false)).to be(false) # four services: no single one
    end

    it "read enum fields as Symbols, unknown numbers as Integers, and accept Symbol, String or Integer" do
      info = Flowctl::V1::ComponentInfo.new(type: :COMPONENT_TYPE_PROCESSOR)
      expect(info.type).to eq(:COMPONENT_TYPE_PROCESSOR)
      info.type = "COMPONENT_TYPE_SOURCE"
      expect(info.type).to eq(:COMPONENT_TYPE_SOURCE)
      info.type = 3
      expect(info.type).to eq(:COMPONENT_TYPE_CONSUMER)
      expect(Flowctl::V1::ComponentInfo.decode("\x28\x09".b).type).to eq(9) # field 5 = 9: unknown
      expect(Flowctl::V1::HealthStatus.value(:HEALTH_STATUS_STOPPING)).to eq(5)
    end

    it "give fields past the eighth their own accessors (ComponentInfo#metadata is its ninth)" do
      info = Flowctl::V1::ComponentInfo.new(endpoint: "127.0.0.1:1", metadata: { "zone" => "a" })
      expect(info.metadata).to eq("zone" => "a")
      expect(info.endpoint).to eq("127.0.0.1:1")
      info.metadata = { "zone" => "b" }
      expect(Flowctl::V1::ComponentInfo.decode(info.to_proto).metadata).to eq("zone" => "b")
    end
  end

  describe "a user's .proto at run time" do
    # (another spec file may have loaded the same file first, under its own root: the classes
    # are where that load put them)
    let!(:loaded) { Flowctl.load_descriptor_set(protoc_set("acme/orders.proto"), root: ACME) }
    let(:order_class) { loaded.fetch("acme.orders.v1.Order") }
  
    it "defines messages, nested types, enums and services under the package's modules" do
      expect(loaded.keys).to include("acme.orders.v1.Order", "acme.orders.v1.Order.Line", "acme.common.Money",
                                     "acme.orders.v1.Priority", "acme.orders.v1.Order.State", "acme.orders.v1.Orders")
      expect(order_class.name).to end_with("Acme::Orders::V1::Order")
      expect(order_class::Line.fields).to eq(%i[sku quantity price_cents])
      expect(order_class::State::STATE_PAID).to eq(1)
      expect(order_class::Line).to equal(loaded["acme.orders.v1.Order.Line"])
      orders = loaded.fetch("acme.orders.v1.Orders")
      expect(orders.rpcs.map(&:shape)).to eq(%i[unary server_streaming client_streaming bidi])
      expect(order_class.name).to start_with("FlowctlSpecAcme::").or start_with("FlowctlSpecInterop::")
      outer = Object.const_get(order_class.name.delete_suffix("::Order"))
      expect(outer::Service).to equal(orders)
      expect(outer::Orders).to equal(orders)
    end

    it "keeps proto3 optional presence and oneof membership" do
      o = order_class.new
      expect(o.discount_cents).to be_nil
      o.discount_cents = 0
      expect(order_class.decode(o.to_proto).discount_cents).to eq(0)
      o.card_token = "tok"
      o.invoice_number = 0
      expect([o.card_token, o.invoice_number]).to eq([nil, 0])
      back = order_class.decode(o.to_proto)
      expect([back.card_token, back.invoice_number, back.voucher]).to eq([nil, 0, nil])
      o.voucher = { currency: "EUR", units: 5 }
      expect(o.invoice_number).to be_nil
      expect(order_class.decode(o.to_proto).voucher.units).to eq(5)
    end

    it "keeps the last member of a oneof seen on the wire" do
      a = order_class.new(card_token: "t").to_proto
      b = order_class.new(invoice_number: 7).to_proto
      o = order_class.decode(a + b)
      expect([o.card_token, o.invoice_number]).to eq([nil, 7])
    end

    it "reads a field named like a Message method by name, not through the method" do
      o = order_class.new(hash: "abc")
      expect(o[:hash]).to eq("abc")
      expect(o.hash).to be_an(Integer)
      o[:hash] = "def"
      expect(order_class.decode(o.to_proto)[:hash]).to eq("def")
    end

    it "handles recursive types and maps of messages" do
      o = order_class.new(id: "child", parent: { id: "parent", parent: { id: "grand" } },
                          lines_by_slot: { 3 => { sku: "s", quantity: 1 } })
      back = order_class.decode(o.to_proto)
      expect(back.parent.parent.id).to eq("grand")
      expect(back.lines_by_slot[3].sku).to eq("s")
    end

    it "loads the same file again as a no-op that returns the classes where they are" do
      again = Flowctl.load_descriptor_set(protoc_set("acme/orders.proto"), root: Module.new)
      expect(again["acme.orders.v1.Order"]).to equal(order_class)
      expect(again.keys).to match_array(loaded.keys)
    end

    it "is byte-compatible both ways with google-protobuf classes generated from the same file" do
      out = Dir.mktmpdir("flowctl-gen")
      system("grpc_tools_ruby_protoc", "-I#{DESCRIPTOR_FIXTURES}", "-I/usr/include", "--ruby_out=#{out}",
             File.join(DESCRIPTOR_FIXTURES, "acme/orders.proto"), File.join(DESCRIPTOR_FIXTURES, "acme/common.proto")) or raise "protoc"
      script = <<~RUBY
        $LOAD_PATH.unshift(#{out.inspect})
        require "acme/orders_pb"
        o = Acme::Orders::V1::Order.decode(STDIN.binmode.read)
        o.lines << Acme::Orders::V1::Order::Line.new(sku: "from-google", quantity: 9)
        STDOUT.binmode.write(Acme::Orders::V1::Order.encode(o))
      RUBY
      ours = order_class.new(id: "o1", lines: [{ sku: "a", quantity: 2, price_cents: -5 }], labels: { "k" => "v" },
                             state: :STATE_SHIPPED, priority: :PRIORITY_HIGH, discount_cents: 0,
                             created_at: Time.at(1_700_000_000, 5, :nsec), invoice_number: 0,
                             weights: [1.5, -2.0], signature: "\x00\xff".b, gift: true, checksum: 7,
                             offset: -9, rating: 0.5, total: { currency: "EUR", units: 3 },
                             priorities: %i[PRIORITY_LOW PRIORITY_HIGH], hash: "h")
      back = IO.popen([RbConfig.ruby, "-e", script], "r+b") do |io|
        io.write(ours.to_proto)
        io.close_write
        io.read
      end
      expect($?.success?).to be(true)
      theirs = order_class.decode(back)
      expect(theirs.lines.map(&:sku)).to eq(%w[a from-google])
      expect(theirs.discount_cents).to eq(0)
      expect(theirs.invoice_number).to eq(0)
      expect(theirs.created_at).to eq(Time.at(1_700_000_000, 5, :nsec))
      expect(theirs.priorities).to eq(%i[PRIORITY_LOW PRIORITY_HIGH])
      theirs.lines = ours.lines
      expect(theirs).to eq(ours)
    end
  end

  describe "bad descriptor sets" do
    it "refuses garbage with DescriptorError" do
      expect { load("\xff\xff\xff".b) }.to raise_error(Flowctl::DescriptorError, /malformed descriptor set/)
      expect { load(42) }.to raise_error(TypeError, /binary String/)
    end

    it "names an import that is neither in the set nor loaded" do
      bytes = set_of(file("bad/a.proto", deps: ["bad/missing.proto"]))
      expect { load(bytes) }.to raise_error(Flowctl::DescriptorError, %r{bad/a.proto: imports bad/missing.proto})
    end

    it "names an unresolved type" do
      bytes = set_of(file("bad/a.proto", messages: [message("A", field("b", 1, type: :TYPE_MESSAGE,
                                                                                type_name: ".bad.v1.Nowhere"))]))
      expect { load(bytes) }.to raise_error(Flowctl::DescriptorError, /field bad.v1.A.b: type bad.v1.Nowhere is not defined/)
    end

    it "names a type name that is not a fully qualified name (a NUL in it, found by fuzzing)" do
      ["bad.v1.A", ".bad.\u0001\u0000", ".bad..A", ""].each do |name|
        bytes = set_of(file("bad/q.proto", messages: [message("Q", field("b", 1, type: :TYPE_MESSAGE, type_name: name))]))
        expect { load(bytes) }.to raise_error(Flowctl::DescriptorError, /field bad.v1.Q.b: type name .* is not a fully qualified name/)
      end
    end

    it "names a type whose name holds a dot or a NUL (found by fuzzing)" do
      ["\u0000.A", "A.", "A.B"].each do |name|
        expect { load(set_of(file("bad/n.proto", messages: [message(name)]))) }
          .to raise_error(Flowctl::DescriptorError, /is not a valid name/)
      end
    end

    it "names a map entry that declares nested types (a KeyError before: found by fuzzing)" do
      entry = message("Entry", field("key", 1), field("value", 2))
      entry.options = { map_entry: true }
      entry.nested_type = [message("Inner")]
      outer = message("M", field("m", 1, type: :TYPE_MESSAGE, label: :LABEL_REPEATED, type_name: ".bad.me.M.Entry"))
      outer.nested_type = [entry]
      expect { load(set_of(file("bad/me.proto", package: "bad.me", messages: [outer]))) }
        .to raise_error(Flowctl::DescriptorError, /map entry bad.me.M.Entry must not declare nested types or enums/)
    end

    it "names an enum value without a number (found by fuzzing)" do
      enum = Flowctl::Protobuf::EnumDescriptorProto.new(name: "E", value: [{ name: "E_ZERO" }])
      expect { load(set_of(file("bad/e.proto", enums: [enum]))) }
        .to raise_error(Flowctl::DescriptorError, /enum bad.v1.E: value E_ZERO has no number/)
    end

    it "checks Ruby constant names before anything is built (a ruby_package found by fuzzing)" do
      f = file("rb/p.proto", package: "rb.v1", messages: [message("A")])
      f.options = { ruby_package: "Google.Protobuf.WellKnownTypes" }
      expect { load(set_of(f)) }.to raise_error(Flowctl::DescriptorError, /"Google.Protobuf.WellKnownTypes" is not a Ruby constant name/)
      expect(Flowctl::Native.descriptor_kind("rb.v1.A")).to be_nil
      expect { load(set_of(file("rb/q.proto", package: "rb.q", messages: [message("_x")]))) }
        .to raise_error(Flowctl::DescriptorError, /"_x" is not a Ruby constant name/)
      expect { load(set_of(file("rb/c.proto", package: "rb.c", messages: [message("foo"), message("Foo")]))) }
        .to raise_error(Flowctl::DescriptorError, /Ruby constant Foo is taken by rb.c.foo too/)
      root = Module.new
      root.const_set(:Rb, Module.new)
      root::Rb.const_set(:D, Module.new)
      root::Rb::D.const_set(:Taken, 1)
      expect { Flowctl.load_descriptor_set(set_of(file("rb/d.proto", package: "rb.d", messages: [message("Taken")])), root: root) }
        .to raise_error(Flowctl::DescriptorError, /Rb::D::Taken exists already/)
      expect(Flowctl.load_descriptor_set(set_of(file("rb/e.proto", package: "rb.snake_case_1", messages: [message("M")])),
                                         root: root).values.first.name).to end_with("Rb::SnakeCase1::M")
    end

    it "names a type of the wrong kind" do
      enum = Flowctl::Protobuf::EnumDescriptorProto.new(name: "E", value: [{ name: "E_ZERO", number: 0 }])
      bytes = set_of(file("bad/a.proto", enums: [enum],
                          messages: [message("A", field("b", 1, type: :TYPE_MESSAGE, type_name: ".bad.v1.E"))]))
      expect { load(bytes) }.to raise_error(Flowctl::DescriptorError, /bad.v1.E is an enum, not a message/)
    end

    it "names a type defined twice, in one set or against one loaded before" do
      bytes = set_of(file("bad/a.proto", messages: [message("A")]), file("bad/b.proto", messages: [message("A")]))
      expect { load(bytes) }.to raise_error(Flowctl::DescriptorError, /bad.v1.A is defined twice \(also in bad\/a.proto\)/)
      expect { load(set_of(file("mine/event.proto", package: "flowctl.v1", messages: [message("Event")]))) }
        .to raise_error(Flowctl::DescriptorError, /flowctl.v1.Event is defined twice/)
    end

    it "names bad field numbers, duplicate fields and groups" do
      [[[field("a", 0)], /number 0, outside/],
       [[field("a", 19_500)], /number 19500/],
       [[field("a", 1), field("b", 1)], /the same number 1/],
       [[field("a", 1), field("a", 2)], /field bad.v1.M.a is defined twice/],
       [[field("a", 1, type: :TYPE_GROUP)], /groups are not supported/]].each do |fields, error|
        expect { load(set_of(file("bad/m.proto", messages: [message("M", *fields)]))) }
          .to raise_error(Flowctl::DescriptorError, error)
      end
    end

    it "refuses a file loaded before with other contents, and unsupported syntax" do
      mod = Module.new
      Flowctl.load_descriptor_set(set_of(file("same/x.proto", package: "same.v1", messages: [message("X")])), root: mod)
      other = set_of(file("same/x.proto", package: "same.v1", messages: [message("X", field("a", 1))]))
      expect { Flowctl.load_descriptor_set(other, root: mod) }
        .to raise_error(Flowctl::DescriptorError, /same\/x.proto: was loaded before with other contents/)
      expect { load(set_of(file("ed/x.proto", syntax: "editions"))) }
        .to raise_error(Flowctl::DescriptorError, /syntax "editions" is not supported/)
    end

    it "leaves nothing defined when a set fails part-way" do
      bytes = set_of(file("half/a.proto", package: "half.v1", messages: [message("Good")]),
                     file("half/b.proto", package: "half.v1",
                                          messages: [message("Bad", field("x", 1, type: :TYPE_MESSAGE, type_name: ".no.Such"))]))
      expect { load(bytes) }.to raise_error(Flowctl::DescriptorError)
      expect(Flowctl::Native.descriptor_kind("half.v1.Good")).to be_nil
      expect { load(set_of(file("half/a.proto", package: "half.v1", messages: [message("Good")]))) }.not_to raise_error
    end
  end
end
