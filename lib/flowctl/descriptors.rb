# frozen_string_literal: true

module Flowctl
  # A descriptor set that cannot be loaded: malformed bytes, an unknown import, a duplicate
  # or unresolved name, a construct the gem does not support. The message names the file
  # and the element.
  class DescriptorError < Error; end

  # Loads descriptor sets (`protoc --descriptor_set_out=x.pb --include_imports`): every
  # message becomes a Flowctl::Message class, every enum a module extended with
  # Flowctl::Enum, every service a Flowctl::Service. The gem's own protocols are loaded this
  # way too (lib/flowctl/protocols.pb, written by `rake proto`): one path for both.
  #
  # This file checks and decides (names, modules, shapes); Flowctl::Native.build_descriptors
  # (ext/flowctl/descriptor.c) only allocates and links what it is given.
  module Descriptors
    # protobuf-c's numbers (protobuf-c.h)
    C_LABEL = { required: 0, optional: 1, repeated: 2, none: 3 }.freeze
    C_TYPE = {
      TYPE_INT32: 0, TYPE_SINT32: 1, TYPE_SFIXED32: 2, TYPE_INT64: 3, TYPE_SINT64: 4, TYPE_SFIXED64: 5,
      TYPE_UINT32: 6, TYPE_FIXED32: 7, TYPE_UINT64: 8, TYPE_FIXED64: 9, TYPE_FLOAT: 10, TYPE_DOUBLE: 11,
      TYPE_BOOL: 12, TYPE_ENUM: 13, TYPE_STRING: 14, TYPE_BYTES: 15, TYPE_MESSAGE: 16
    }.freeze
    FLAG_PACKED = 1
    FLAG_ONEOF = 4
    PACKABLE = (C_TYPE.keys - %i[TYPE_STRING TYPE_BYTES TYPE_MESSAGE]).freeze
    MAP_KEY_TYPES = (PACKABLE - %i[TYPE_FLOAT TYPE_DOUBLE TYPE_ENUM]) + [:TYPE_STRING]
    TIMESTAMP = "google.protobuf.Timestamp"
    MAX_FIELD_NUMBER = (1 << 29) - 1
    RESERVED_NUMBERS = (19_000..19_999).freeze
    IDENT = /\A[A-Za-z_][A-Za-z0-9_]*\z/
    TYPE_NAME = /\A(?:\.[A-Za-z_][A-Za-z0-9_]*)+\z/
    SERVICE_SHAPES = { [false, false] => :unary, [false, true] => :server_streaming,
                       [true, false] => :client_streaming, [true, true] => :bidi }.freeze

    @files = {}   # file name => its FileDescriptorProto bytes (:bootstrap for descriptor.proto)
    @kinds = {}   # full type name => :message or :enum (every loaded type)
    @defined = {} # file name => { full name => class, module or Service } (what it defined)
    @declared = {} # full message name => [[field name, json_name], ...] as declared (JSON, reflection)
    @lock = Mutex.new

    class << self
      # Loads a serialized FileDescriptorSet; returns { full name => class, module or Service }
      # of every type its files define. Types are the process's, like google-protobuf's
      # generated pool: a file loaded before (same name, same contents) is not loaded again,
      # and its classes are returned where they are.
      # packages: { "proto.package" => Module } where a package's types go; other packages
      # go under root, by their `ruby_package` option or their camelized package name.
      def load(bytes, root: Object, packages: {})
        raise TypeError, "a descriptor set is a binary String (given #{bytes.class})" unless bytes.is_a?(String)

        set = decode(bytes)
        @lock.synchronize do
          loader = Loader.new(set, root, packages, @files, @kinds, @defined)
          loaded = loader.run
          @declared.merge!(loader.declared) { |_, before, _| before }
          loaded
        end
      end

      # The fields of a loaded message in declaration order with their JSON names (the
      # descriptor's json_name, protoc's or a [json_name = ...] option): [[:name, "jsonName"], ...].
      # nil for a message no descriptor set defined.
      def declared_fields(full_name) = @declared[full_name]

      # The class, enum module or Service a loaded descriptor set defined for a full proto
      # name, or nil.
      def defined_type(full_name)
        @lock.synchronize { @defined.each_value.find { |types| types.key?(full_name) }&.fetch(full_name) }
      end

      # Marks google/protobuf/descriptor.proto as loaded: its classes come from protoc-c's
      # descriptors (Native.define_bootstrap), and a set that includes it uses those.
      def bootstrap
        @files["google/protobuf/descriptor.proto"] = :bootstrap
      end

      private

      def decode(bytes)
        Protobuf::FileDescriptorSet.decode(bytes)
      rescue DecodeError => e
        raise DescriptorError, "malformed descriptor set: #{e.message}"
      end
    end

    # One load: checks everything first, then builds the descriptors, then defines classes.
    class Loader
      def initialize(set, root, packages, files, kinds, defined)
        @set = set
        @defined = defined
        @root = root
        @packages = packages
        @files = files
        @kinds = kinds
        @new_kinds = {}
        @enums = []     # [full_name, package, values, outer_full_name]
        @messages = []  # [full_name, package, fields, outer_full_name, map_entry, DescriptorProto]
        @services = []  # [full_name, package, methods]
        @file_of = {}
      end

      def run
        files = @set.file.reject { |f| skip?(f) }
        names = files.map(&:name)
        files.each { |f| check_imports(f, names) }
        files.each { |f| collect_file(f) }
        @messages.each { |m| m[2] = m[2].map { |f| resolve_field(f, m[0]) } }
        @services.each { |s| s[2] = s[2].map { |m| resolve_method(s[0], m) } }
        check_ruby_names
        Native.build_descriptors(@enums.map { |e| e.first(3) }, @messages.map { |m| m.first(3) })
        @kinds.merge!(@new_kinds)
        files.each { |f| @files[f.name] = f.to_proto }
        made = define_all
        made.each { |full, obj| (@defined[@file_of[full]] ||= {})[full] = obj }
        @set.file.each_with_object({}) { |f, all| all.merge!(@defined.fetch(f.name, {})) }.freeze
      end

      # [[field name, json_name], ...] of each message of this load, as declared.
      def declared
        @messages.to_h do |full, _pkg, _fields, _outer, _entry, msg|
          [full, msg.field.map { |f| [f.name.to_sym, f.json_name.to_s.freeze] }.freeze]
        end
      end

      private

      def fail!(file, msg) = raise(DescriptorError, "#{file}: #{msg}")

      def skip?(file)
        fail!("(a file without a name)", "every file of a descriptor set needs a name") if file.name.to_s.empty?
        known = @files[file.name]
        return false if known.nil?
        return true if known == :bootstrap || known == file.to_proto

        fail!(file.name, "was loaded before with other contents")
      end

      def check_imports(file, names)
        unless ["", "proto2", "proto3"].include?(file.syntax.to_s)
          fail!(file.name, "syntax #{file.syntax.inspect} is not supported (proto2 and proto3 are)")
        end
        file.dependency.each do |dep|
          next if names.include?(dep) || @files.key?(dep)

          fail!(file.name, "imports #{dep}, which is neither in this descriptor set nor loaded before " \
                           "(use protoc --include_imports)")
        end
      end

      def collect_file(file)
        pkg = file.package.to_s
        pkg.split(".").each { |part| fail!(file.name, "package #{pkg.inspect} is not a valid name") unless part.match?(IDENT) }
        prefix = pkg.empty? ? "" : "#{pkg}."
        file.enum_type.each { |e| collect_enum(file, pkg, prefix, e, nil) }
        file.message_type.each { |m| collect_message(file, pkg, prefix, m, nil) }
        file.service.each { |s| collect_service(file, pkg, prefix, s) }
      end

      # name: the type's own name (no dots), full: its package (checked) and outer types + name
      def claim(file, full, kind, name)
        fail!(file.name, "#{full.inspect}: #{name.inspect} is not a valid name") unless name.to_s.match?(IDENT)
        if @new_kinds.key?(full) || @kinds.key?(full) || Native.descriptor_kind(full)
          where = @file_of[full] || "a descriptor set loaded before"
          fail!(file.name, "#{full} is defined twice (also in #{where})")
        end
        @new_kinds[full] = kind
        @file_of[full] = file.name
      end

      def collect_enum(file, pkg, prefix, enum, outer)
        full = "#{prefix}#{enum.name}"
        claim(file, full, :enum, enum.name)
        fail!(file.name, "enum #{full} has no values") if enum.value.empty?
        seen = {}
        values = enum.value.map do |v|
          fail!(file.name, "enum #{full}: value name #{v.name.inspect} is not valid") unless v.name.to_s.match?(IDENT)
          fail!(file.name, "enum #{full}: value #{v.name} is defined twice") if seen[v.name]
          fail!(file.name, "enum #{full}: value #{v.name} has no number") if v.number.nil?

          seen[v.name] = true
          [v.name, v.number]
        end
        @enums << [full, pkg, values, outer]
      end

      def collect_message(file, pkg, prefix, msg, outer)
        full = "#{prefix}#{msg.name}"
        claim(file, full, :message, msg.name)
        entry = msg.options&.map_entry ? true : false
        if (entry || full == TIMESTAMP) && (msg.nested_type.any? || msg.enum_type.any?)
          # a map entry becomes a Hash and a Timestamp a Time: neither has a class to hold types
          fail!(file.name, "#{entry ? "map entry" : "message"} #{full} must not declare nested types or enums")
        end
        @messages << [full, pkg, msg.field.map { |f| [file, f] }, outer, entry, msg]
        msg.enum_type.each { |e| collect_enum(file, pkg, "#{full}.", e, full) }
        msg.nested_type.each { |m| collect_message(file, pkg, "#{full}.", m, full) }
        check_fields(file, full, msg)
      end

      def check_fields(file, full, msg)
        numbers = {}
        names = {}
        msg.field.each do |f|
          where = "#{full}.#{f.name}"
          fail!(file.name, "field name #{where.inspect} is not valid") unless f.name.to_s.match?(IDENT)
          fail!(file.name, "field #{where} is defined twice") if names[f.name]
          n = f.number.to_i
          if n < 1 || n > MAX_FIELD_NUMBER || RESERVED_NUMBERS.cover?(n)
            fail!(file.name, "field #{where} has number #{n}, outside 1..#{MAX_FIELD_NUMBER} or in 19000..19999")
          end
          fail!(file.name, "fields #{numbers[n]} and #{where} have the same number #{n}") if numbers[n]
          fail!(file.name, "field #{where}: groups are not supported") if f.type == :TYPE_GROUP
          fail!(file.name, "field #{where}: type #{f.type.inspect} is not a field type") unless C_TYPE.key?(f.type)
          unless f.default_value.nil? || f.default_value.empty?
            fail!(file.name, "field #{where}: proto2 default values are not supported")
          end
          if f.oneof_index && !(0...msg.oneof_decl.size).cover?(f.oneof_index)
            fail!(file.name, "field #{where}: oneof index #{f.oneof_index} is out of range")
          end
          numbers[n] = where
          names[f.name] = true
        end
      end

      def collect_service(file, pkg, prefix, svc)
        full = "#{prefix}#{svc.name}"
        claim(file, full, :service, svc.name)
        seen = {}
        methods = svc[:method].map do |m|  # `method` is Object#method: read by name
          fail!(file.name, "service #{full}: method name #{m.name.inspect} is not valid") unless m.name.to_s.match?(IDENT)
          fail!(file.name, "service #{full}: method #{m.name} is defined twice") if seen[m.name]

          seen[m.name] = true
          [file, m]
        end
        @services << [full, pkg, methods]
      end

      def lookup(file, where, type_name)
        unless type_name.to_s.match?(TYPE_NAME)
          fail!(file.name, "#{where}: type name #{type_name.inspect} is not a fully qualified name (use protoc's output)")
        end
        name = type_name[1..]
        kind = @new_kinds[name] || @kinds[name] || Native.descriptor_kind(name)
        fail!(file.name, "#{where}: type #{name} is not defined in this descriptor set nor loaded before") unless kind

        [name, kind]
      end

      # [name, number, label, type, type_name, flags, oneof] as descriptor.c takes them
      def resolve_field((file, f), full)
        where = "field #{full}.#{f.name}"
        type_name = nil
        if %i[TYPE_MESSAGE TYPE_ENUM].include?(f.type)
          type_name, kind = lookup(file, where, f.type_name)
          want = f.type == :TYPE_MESSAGE ? :message : :enum
          fail!(file.name, "#{where}: #{type_name} is a#{kind == :enum ? 'n' : ''} #{kind}, not a#{want == :enum ? 'n' : ''} #{want}") unless kind == want
          check_map(file, where, type_name, f) if f.label == :LABEL_REPEATED && want == :message
        end
        proto3 = file.syntax == "proto3"
        real_oneof = f.oneof_index && !f.proto3_optional
        label = case f.label
                when :LABEL_REPEATED then :repeated
                when :LABEL_REQUIRED then :required
                else real_oneof || f.proto3_optional || !proto3 ? :optional : :none
                end
        packed = f.label == :LABEL_REPEATED && PACKABLE.include?(f.type) &&
                 (f.options&.packed.nil? ? proto3 : f.options.packed)
        flags = (packed ? FLAG_PACKED : 0) | (real_oneof ? FLAG_ONEOF : 0)
        [f.name, f.number, C_LABEL.fetch(label), C_TYPE.fetch(f.type), type_name, flags, real_oneof ? f.oneof_index : nil]
      end

      def check_map(file, where, type_name, _field)
        entry = @messages.find { |m| m[0] == type_name }
        return unless entry && entry[4] # a repeated message, not a map

        fields = entry[5].field
        key = fields.find { |x| x.number == 1 }
        value = fields.find { |x| x.number == 2 }
        unless fields.size == 2 && key&.name == "key" && value&.name == "value"
          fail!(file.name, "#{where}: map entry #{type_name} must have exactly the fields key = 1 and value = 2")
        end
        fail!(file.name, "#{where}: map key type #{key.type} is not allowed") unless MAP_KEY_TYPES.include?(key.type)
      end

      def resolve_method(service, (file, m))
        where = "method #{service}.#{m.name}"
        input, ikind = lookup(file, where, m.input_type)
        output, okind = lookup(file, where, m.output_type)
        fail!(file.name, "#{where}: input #{input} is not a message") unless ikind == :message
        fail!(file.name, "#{where}: output #{output} is not a message") unless okind == :message

        [m.name, input, output, SERVICE_SHAPES.fetch([m.client_streaming ? true : false, m.server_streaming ? true : false])]
      end

      # ---- defining classes, modules and services ----

      def define_all
        out = {}
        @messages.each do |full, pkg, _fields, outer, entry|
          next if entry || full == TIMESTAMP # map entries are Hashes, Timestamps are Times

          out[full] = Native.define_message(full, outer ? out.fetch(outer) : package_module(pkg), const_name(full))
        end
        @enums.each do |full, pkg, _values, outer|
          out[full] = Native.define_enum(full, outer ? out.fetch(outer) : package_module(pkg), const_name(full))
        end
        define_services(out)
        out.freeze
      end

      def define_services(out)
        @services.group_by { |s| s[1] }.each do |pkg, services|
          mod = package_module(pkg)
          services.each do |full, _pkg, methods|
            out[full] = Service.new(full, methods)
            # (a service named as its package's module, like the seed's ControlPlane in
            # Flowctl::ControlPlane, would shadow that module inside it: it is only `Service`)
            mod.const_set(const_name(full), out[full]) unless mod.name&.split("::")&.last == const_name(full)
          end
          mod.const_set(:Service, services.first && out[services.first[0]]) if services.size == 1 && !mod.const_defined?(:Service, false)
        end
      end

      # "flowctl.v1.Event" -> "Event"; a lower-case proto name gets a capital first letter
      def const_name(full)
        name = full.split(".").last
        name[0].upcase + name[1..]
      end

      CONST = /\A[A-Z][A-Za-z0-9_]*\z/

      # Every constant this load will set, checked before anything is built: valid Ruby
      # constant names, modules where modules are needed, nothing defined twice or over an
      # existing constant.
      def check_ruby_names
        taken = {}
        types = @messages.reject { |m| m[4] || m[0] == TIMESTAMP }.map { |m| [m[0], m[1], m[3]] } +
                @enums.map { |e| [e[0], e[1], e[3]] } + @services.map { |sv| [sv[0], sv[1], nil] }
        types.each do |full, pkg, outer|
          name = const_name(full)
          fail!(@file_of[full], "#{full}: #{name.inspect} is not a Ruby constant name") unless name.match?(CONST)

          key = [outer || module_path(pkg), name]
          fail!(@file_of[full], "#{full}: Ruby constant #{name} is taken by #{taken[key]} too") if taken[key]
          taken[key] = full
          next if outer

          mod = existing_module(pkg)
          fail!(@file_of[full], "#{full}: #{mod}::#{name} exists already") if mod&.const_defined?(name, false)
        end
      end

      # The constant path of a package's module: [root or module, "Part", ...]
      def module_path(pkg)
        return [@packages[pkg]] if @packages.key?(pkg)

        file = @set.file.find { |f| f.package.to_s == pkg }
        ruby = file&.options&.ruby_package.to_s
        parts = ruby.empty? ? pkg.split(".").map { |p| p.gsub(/(?:\A|_+)([a-z0-9])/) { ::Regexp.last_match(1).upcase } } : ruby.split("::")
        bad = parts.find { |p| !p.match?(CONST) }
        fail!(file&.name, "package #{pkg}: #{bad.inspect} is not a Ruby constant name (ruby_package #{ruby.inspect})") if bad
        [@root, *parts]
      end

      # The package's module when it exists already (nil when it does not yet); a constant
      # on the way that is not a module is an error.
      def existing_module(pkg)
        root, *parts = module_path(pkg)
        parts.reduce(root) do |mod, part|
          return nil unless mod.const_defined?(part, false)

          found = mod.const_get(part, false)
          raise DescriptorError, "package #{pkg}: #{mod}::#{part} exists and is not a module" unless found.is_a?(Module)

          found
        end
      end

      def package_module(pkg)
        @package_modules ||= {}
        @package_modules[pkg] ||= @packages[pkg] || ruby_module(pkg)
      end

      def ruby_module(pkg)
        root, *parts = module_path(pkg)
        parts.reduce(root) do |mod, part|
          if mod.const_defined?(part, false)
            found = mod.const_get(part, false)
            raise DescriptorError, "package #{pkg}: #{mod}::#{part} exists and is not a module" unless found.is_a?(Module)

            found
          else
            mod.const_set(part, Module.new)
          end
        end
      end
    end
  end

  # Loads a user's descriptor set at run time (`protoc --descriptor_set_out=x.pb
  # --include_imports my.proto`): its messages, enums and services become classes the
  # clients and Flowctl::Server use like the built-in ones. Returns { full name => class }.
  #
  #   Flowctl.load_descriptor_set(File.binread("orders.pb"))
  #   Acme::Orders::V1::Order.new(id: "o1")
  def self.load_descriptor_set(bytes, root: Object, packages: {})
    Descriptors.load(bytes, root: root, packages: packages)
  end
end
