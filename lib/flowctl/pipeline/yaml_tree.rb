# frozen_string_literal: true

require "psych"

module Flowctl
  module Pipeline
    # A YAML document read with Psych's node API into a small tree that remembers the
    # line of every value, so that the pipeline loader can say where each problem is.
    # Nothing is instantiated from tags: scalars become String, Integer, Float, true,
    # false or nil; anchors and aliases share one converted value (no expansion, so an
    # alias bomb costs nothing); a recursive alias, a foreign tag, a document that is too
    # deep or too big is a YamlTree::Error with its line.
    #
    #   tree = YamlTree.parse(File.read("pipeline.yaml"), file: "pipeline.yaml")
    #   tree.root              # => YamlTree::Map
    #   tree.root["spec"].line # => 5 (1-based)
    module YamlTree
      # A problem with the YAML itself: line is 1-based (nil when unknown).
      class Error < StandardError
        attr_reader :line

        def initialize(message, line)
          super(message)
          @line = line
        end
      end

      # A scalar: value is typed (YAML 1.1 core rules, as Psych's safe_load), text is
      # what the file says (an argument "007" stays "007" where a String is wanted).
      Scalar = Struct.new(:value, :text, :line, :quoted) do
        def kind = :scalar
        def null? = value.nil? && !quoted
        def to_ruby(_budget = nil) = value
      end

      # A mapping: pairs is an Array of [key Scalar, value node] in file order.
      Map = Struct.new(:pairs, :line) do
        def kind = :map
        def null? = false
        def [](key) = pairs.find { |k, _| k.text == key }&.last
        def key_node(key) = pairs.find { |k, _| k.text == key }&.first
        def keys = pairs.map { |k, _| k.text }

        def to_ruby(budget = Budget.new)
          pairs.to_h { |k, v| budget.spend(k.line) && [k.text, v.to_ruby(budget)] }
        end
      end

      # A sequence of nodes.
      Seq = Struct.new(:items, :line) do
        def kind = :seq
        def null? = false

        def to_ruby(budget = Budget.new)
          items.map { |v| budget.spend(v.line) && v.to_ruby(budget) }
        end
      end

      # Bounds what converting a tree to plain Ruby may build: shared (aliased) values
      # are built once per use, so a small file could otherwise ask for a huge value.
      class Budget
        def initialize(limit = MAX_NODES)
          @left = limit
        end

        def spend(line)
          @left -= 1
          raise Error.new("the document expands to more than #{MAX_NODES} values (aliases used too often)", line) if @left.negative?

          true
        end
      end

      MAX_DEPTH = 64
      MAX_NODES = 100_000
      MAX_BYTES = 4 * 1024 * 1024

      # The tags a scalar may carry; anything else (!ruby/object, ...) is refused.
      CORE_TAGS = {
        "tag:yaml.org,2002:str" => :str, "tag:yaml.org,2002:int" => :int, "tag:yaml.org,2002:float" => :float,
        "tag:yaml.org,2002:bool" => :bool, "tag:yaml.org,2002:null" => :null, "!" => :str
      }.freeze
      COLLECTION_TAGS = ["tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:omap"].freeze

      # Result of #parse: the root node (nil for an empty document).
      Document = Struct.new(:root)

      module_function

      # Parses text (one YAML document) into a Document. Raises YamlTree::Error.
      def parse(text, file: "(string)")
        raise Error.new("not a String (given #{text.class})", nil) unless text.is_a?(String)
        raise Error.new("larger than #{MAX_BYTES} bytes", nil) if text.bytesize > MAX_BYTES

        stream = Psych.parse_stream(text, filename: file)
        docs = stream.children
        raise Error.new("holds #{docs.size} YAML documents; a pipeline file holds one", docs[1].start_line + 1) if docs.size > 1

        Document.new(docs.empty? ? nil : Converter.new.convert(docs[0].root, 0))
      rescue Psych::SyntaxError => e
        raise Error.new("YAML syntax error: #{e.problem} #{e.context} (column #{e.column})".squeeze(" "), e.line)
      rescue ArgumentError, EncodingError => e # invalid byte sequences and the like
        raise Error.new("cannot be read as YAML: #{e.message}", nil)
      end

      # Walks Psych nodes once; anchored nodes are converted once and shared.
      class Converter
        def initialize
          @anchors = {}
          @count = 0
        end

        def convert(node, depth)
          line = node.start_line + 1
          raise Error.new("nested deeper than #{MAX_DEPTH} levels", line) if depth > MAX_DEPTH

          @count += 1
          raise Error.new("more than #{MAX_NODES} YAML nodes", line) if @count > MAX_NODES
          return resolve_alias(node, line) if node.is_a?(Psych::Nodes::Alias)

          anchor = node.respond_to?(:anchor) ? node.anchor : nil
          @anchors[anchor] = :in_progress if anchor
          value = convert_node(node, depth, line)
          @anchors[anchor] = value if anchor
          value
        end

        private

        def resolve_alias(node, line)
          target = @anchors.fetch(node.anchor) { raise Error.new("unknown alias *#{node.anchor}", line) }
          raise Error.new("alias *#{node.anchor} refers to itself", line) if target == :in_progress

          target
        end

        def convert_node(node, depth, line)
          case node
          when Psych::Nodes::Scalar then scalar(node, line)
          when Psych::Nodes::Mapping then mapping(node, depth, line)
          when Psych::Nodes::Sequence then sequence(node, depth, line)
          else raise Error.new("unexpected YAML node #{node.class.name.split('::').last}", line)
          end
        end

        def check_collection_tag(node, line)
          return if node.tag.nil? || COLLECTION_TAGS.include?(node.tag)

          raise Error.new("YAML tag #{node.tag} is not allowed", line)
        end

        def sequence(node, depth, line)
          check_collection_tag(node, line)
          Seq.new(node.children.map { |c| convert(c, depth + 1) }, line)
        end

        def mapping(node, depth, line)
          check_collection_tag(node, line)
          pairs = []
          merged = []
          node.children.each_slice(2) do |k, v|
            key = convert(k, depth + 1)
            value = convert(v, depth + 1)
            if key.kind == :scalar && key.text == "<<" && !key.quoted
              merged.concat(merge_pairs(value, key.line))
            else
              raise Error.new("a mapping key must be a plain value, not a #{key.kind}", key.line) unless key.kind == :scalar
              if (first = pairs.find { |pk, _| pk.text == key.text })
                raise Error.new("key #{key.text.inspect} is given twice (first at line #{first[0].line})", key.line)
              end

              pairs << [key, value]
            end
          end
          Map.new(pairs + merged.reject { |k, _| pairs.any? { |pk, _| pk.text == k.text } }, line)
        end

        # `<<: *defaults` (or a list of them): their keys, for those the mapping does not set itself.
        def merge_pairs(value, line)
          sources = value.kind == :seq ? value.items : [value]
          sources.each_with_object([]) do |src, out|
            raise Error.new("a merge key (<<) takes a mapping or a list of mappings", line) unless src.kind == :map

            src.pairs.each { |k, v| out << [k, v] unless out.any? { |ok, _| ok.text == k.text } }
          end
        end

        def scalar(node, line)
          text = node.value
          quoted = !node.plain || !node.tag.nil?
          Scalar.new(typed(node, text, line), text.frozen? ? text : text.dup.freeze, line, quoted).freeze
        end

        def typed(node, text, line)
          return plain(text) if node.tag.nil? && node.plain
          return text if node.tag.nil?

          case CORE_TAGS[node.tag]
          when :str then text
          when :null then nil
          when :int then Integer(text.delete("_"), exception: false) || raise(Error.new("#{text.inspect} is not an !!int", line))
          when :float then Float(text, exception: false) || raise(Error.new("#{text.inspect} is not a !!float", line))
          when :bool then bool(text, line)
          else raise Error.new("YAML tag #{node.tag} is not allowed", line)
          end
        end

        def bool(text, line)
          v = plain(text)
          raise Error.new("#{text.inspect} is not a !!bool", line) unless [true, false].include?(v)

          v
        end

        SCANNER = Psych::ScalarScanner.new(Psych::ClassLoader::Restricted.new([], []))
        private_constant :SCANNER

        # Psych's own rules (YAML 1.1): what it would make a Symbol, Date or Time stays a String.
        def plain(text)
          v = SCANNER.tokenize(text)
          [String, Integer, Float, TrueClass, FalseClass, NilClass].any? { |c| v.is_a?(c) } ? v : text
        rescue Psych::DisallowedClass, ArgumentError, RangeError
          text
        end
      end
    end
  end
end
